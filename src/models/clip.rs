//! CLIP text encoders (transformers `CLIPTextModel`, `CLIPTextModelWithProjection`).

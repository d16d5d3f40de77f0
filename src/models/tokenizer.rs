//! CLIP BPE tokenizer giving transformers' `CLIPTokenizer` ids.

//! Original single-file checkpoint names to diffusers' (BFL FLUX.1 `double_blocks.N...`, SAI
//! SD3/SD3.5 `joint_blocks.N...`, with or without a `model.diffusion_model.` prefix), as diffusers'
//! `convert_flux_transformer_checkpoint_to_diffusers` / `convert_sd3_transformer_checkpoint_to_diffusers`
//! map them: a plan of where each diffusers tensor comes from, made from names and shapes alone.
//! Fused projections are split along rows (`qkv` in three, FLUX's `linear1` into q, k, v and the
//! MLP), the halves of the final modulations exchanged (`swap_scale_shift`); the sizes come from
//! the tensors' shapes (diffusers hard-codes FLUX's 3072). A quantized tensor's blocks run along
//! its rows, so a row range is a byte range: nothing is dequantized to be split.

use std::collections::BTreeMap;

use super::gguf::{strip_prefix, Family};

/// Where one diffusers tensor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The source tensor's name (prefix included, as the file has it).
    pub source: String,
    /// The rows (first dimension) taken, `(start, count)`; None: the whole tensor.
    pub rows: Option<(u64, u64)>,
    /// diffusers' `swap_scale_shift`: the two halves of the rows exchanged.
    pub swap_halves: bool,
}

/// The diffusers tensors of an original-named transformer: diffusers name -> [`Piece`]. `shapes`
/// maps every tensor of the file (torch-order shapes). Errors name a missing tensor, one whose
/// rows cannot be split as the layout needs, or tensors the conversion does not use.
pub fn to_diffusers(family: Family, shapes: &BTreeMap<String, Vec<u64>>) -> Result<BTreeMap<String, Piece>, String> {
    let mut c = Conv { src: shapes.iter().map(|(k, v)| (strip_prefix(k).to_string(), (k.clone(), v.clone()))).collect(), out: BTreeMap::new() };
    match family {
        Family::Flux => flux(&mut c)?,
        Family::Sd3 => sd3(&mut c)?,
    }
    if !c.src.is_empty() {
        let left: Vec<&str> = c.src.values().map(|(k, _)| k.as_str()).take(5).collect();
        return Err(format!("{} tensors are not part of a {} transformer: {}{}", c.src.len(), family.as_str(), left.join(", "), if c.src.len() > 5 { ", ..." } else { "" }));
    }
    Ok(c.out)
}

struct Conv {
    /// Stripped name -> (name in the file, shape), removed as they are used.
    src: BTreeMap<String, (String, Vec<u64>)>,
    out: BTreeMap<String, Piece>,
}

impl Conv {
    fn pop(&mut self, from: &str) -> Result<(String, Vec<u64>), String> {
        self.src.remove(from).ok_or_else(|| format!("tensor `{from}` is missing"))
    }
    fn has(&self, from: &str) -> bool {
        self.src.contains_key(from)
    }
    fn rows(&self, from: &str) -> Result<u64, String> {
        self.src.get(from).and_then(|(_, s)| s.first().copied()).ok_or_else(|| format!("tensor `{from}` is missing"))
    }
    fn take(&mut self, from: &str, to: &str) -> Result<(), String> {
        let (source, _) = self.pop(from)?;
        self.out.insert(to.to_string(), Piece { source, rows: None, swap_halves: false });
        Ok(())
    }
    /// `from.weight` / `from.bias` to `to.weight` / `to.bias`.
    fn linear(&mut self, from: &str, to: &str) -> Result<(), String> {
        self.take(&format!("{from}.weight"), &format!("{to}.weight"))?;
        self.take(&format!("{from}.bias"), &format!("{to}.bias"))
    }
    /// Rows of `from` split in `sizes` (torch.split along dim 0), in order, to `tos`.
    fn split(&mut self, from: &str, tos: &[String], sizes: &[u64]) -> Result<(), String> {
        let (source, shape) = self.pop(from)?;
        let rows = shape.first().copied().unwrap_or(0);
        if sizes.iter().sum::<u64>() != rows {
            return Err(format!("tensor `{source}` has {rows} rows, not the {} ({}) its split needs", sizes.iter().sum::<u64>(), sizes.iter().map(u64::to_string).collect::<Vec<_>>().join(" + ")));
        }
        let mut at = 0;
        for (to, &n) in tos.iter().zip(sizes) {
            self.out.insert(to.clone(), Piece { source: source.clone(), rows: Some((at, n)), swap_halves: false });
            at += n;
        }
        Ok(())
    }
    /// `torch.chunk(3, dim=0)` of a fused q/k/v projection's weight and bias.
    fn qkv(&mut self, from: &str, tos: [&str; 3]) -> Result<(), String> {
        for part in ["weight", "bias"] {
            let name = format!("{from}.{part}");
            let rows = self.rows(&name)?;
            if rows % 3 != 0 {
                return Err(format!("tensor `{name}` has {rows} rows: not three equal q, k, v parts"));
            }
            self.split(&name, &tos.map(|t| format!("{t}.{part}")), &[rows / 3; 3])?;
        }
        Ok(())
    }
    /// `swap_scale_shift` of a modulation's weight and bias.
    fn swapped(&mut self, from: &str, to: &str) -> Result<(), String> {
        for part in ["weight", "bias"] {
            let (source, shape) = self.pop(&format!("{from}.{part}"))?;
            if shape.first().is_none_or(|r| r % 2 != 0) {
                return Err(format!("tensor `{source}` has {shape:?} rows: not two equal shift, scale halves"));
            }
            self.out.insert(format!("{to}.{part}"), Piece { source, rows: None, swap_halves: true });
        }
        Ok(())
    }
    /// One more than the largest block index under `prefix` (`double_blocks.`), 0 if none.
    fn count(&self, prefix: &str) -> usize {
        self.src.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).map(|i| i + 1).max().unwrap_or(0)
    }
}

fn flux(c: &mut Conv) -> Result<(), String> {
    let double = c.count("double_blocks.");
    let single = c.count("single_blocks.");
    let inner = c.rows("img_in.weight")?;
    c.linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")?;
    c.linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")?;
    c.linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")?;
    c.linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")?;
    if c.has("guidance_in.in_layer.weight") {
        c.linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")?;
        c.linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")?;
    }
    c.linear("txt_in", "context_embedder")?;
    c.linear("img_in", "x_embedder")?;
    for i in 0..double {
        let (s, t) = (format!("double_blocks.{i}"), format!("transformer_blocks.{i}"));
        c.linear(&format!("{s}.img_mod.lin"), &format!("{t}.norm1.linear"))?;
        c.linear(&format!("{s}.txt_mod.lin"), &format!("{t}.norm1_context.linear"))?;
        c.qkv(&format!("{s}.img_attn.qkv"), [&format!("{t}.attn.to_q"), &format!("{t}.attn.to_k"), &format!("{t}.attn.to_v")])?;
        c.qkv(&format!("{s}.txt_attn.qkv"), [&format!("{t}.attn.add_q_proj"), &format!("{t}.attn.add_k_proj"), &format!("{t}.attn.add_v_proj")])?;
        for (from, to) in
            [("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"), ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k")]
        {
            c.take(&format!("{s}.{from}.scale"), &format!("{t}.{to}.weight"))?;
        }
        c.linear(&format!("{s}.img_mlp.0"), &format!("{t}.ff.net.0.proj"))?;
        c.linear(&format!("{s}.img_mlp.2"), &format!("{t}.ff.net.2"))?;
        c.linear(&format!("{s}.txt_mlp.0"), &format!("{t}.ff_context.net.0.proj"))?;
        c.linear(&format!("{s}.txt_mlp.2"), &format!("{t}.ff_context.net.2"))?;
        c.linear(&format!("{s}.img_attn.proj"), &format!("{t}.attn.to_out.0"))?;
        c.linear(&format!("{s}.txt_attn.proj"), &format!("{t}.attn.to_add_out"))?;
    }
    for i in 0..single {
        let (s, t) = (format!("single_blocks.{i}"), format!("single_transformer_blocks.{i}"));
        c.linear(&format!("{s}.modulation.lin"), &format!("{t}.norm.linear"))?;
        // linear1: q, k, v (inner rows each), then the MLP's input (the rest).
        let rows = c.rows(&format!("{s}.linear1.weight"))?;
        if rows <= 3 * inner {
            return Err(format!("tensor `{s}.linear1.weight` has {rows} rows: not q, k, v of {inner} (img_in's rows) and an MLP"));
        }
        let sizes = [inner, inner, inner, rows - 3 * inner];
        for part in ["weight", "bias"] {
            let tos = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"].map(|n| format!("{t}.{n}.{part}"));
            c.split(&format!("{s}.linear1.{part}"), &tos, &sizes)?;
        }
        c.take(&format!("{s}.norm.query_norm.scale"), &format!("{t}.attn.norm_q.weight"))?;
        c.take(&format!("{s}.norm.key_norm.scale"), &format!("{t}.attn.norm_k.weight"))?;
        c.linear(&format!("{s}.linear2"), &format!("{t}.proj_out"))?;
    }
    c.linear("final_layer.linear", "proj_out")?;
    c.swapped("final_layer.adaLN_modulation.1", "norm_out.linear")
}

fn sd3(c: &mut Conv) -> Result<(), String> {
    let layers = c.count("joint_blocks.");
    let dual: Vec<usize> = (0..layers).filter(|i| c.src.keys().any(|k| k.starts_with(&format!("joint_blocks.{i}.x_block.attn2.")))).collect();
    let qk_norm = c.src.keys().any(|k| k.contains("ln_q"));
    c.take("pos_embed", "pos_embed.pos_embed")?;
    c.linear("x_embedder.proj", "pos_embed.proj")?;
    c.linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")?;
    c.linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")?;
    c.linear("context_embedder", "context_embedder")?;
    c.linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")?;
    c.linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")?;
    for i in 0..layers {
        let (s, t) = (format!("joint_blocks.{i}"), format!("transformer_blocks.{i}"));
        let last = i + 1 == layers; // its context block is pre-only: no output projection, no MLP
        c.qkv(&format!("{s}.x_block.attn.qkv"), [&format!("{t}.attn.to_q"), &format!("{t}.attn.to_k"), &format!("{t}.attn.to_v")])?;
        c.qkv(&format!("{s}.context_block.attn.qkv"), [&format!("{t}.attn.add_q_proj"), &format!("{t}.attn.add_k_proj"), &format!("{t}.attn.add_v_proj")])?;
        if qk_norm {
            c.take(&format!("{s}.x_block.attn.ln_q.weight"), &format!("{t}.attn.norm_q.weight"))?;
            c.take(&format!("{s}.x_block.attn.ln_k.weight"), &format!("{t}.attn.norm_k.weight"))?;
            c.take(&format!("{s}.context_block.attn.ln_q.weight"), &format!("{t}.attn.norm_added_q.weight"))?;
            c.take(&format!("{s}.context_block.attn.ln_k.weight"), &format!("{t}.attn.norm_added_k.weight"))?;
        }
        c.linear(&format!("{s}.x_block.attn.proj"), &format!("{t}.attn.to_out.0"))?;
        if !last {
            c.linear(&format!("{s}.context_block.attn.proj"), &format!("{t}.attn.to_add_out"))?;
        }
        if dual.contains(&i) {
            c.qkv(&format!("{s}.x_block.attn2.qkv"), [&format!("{t}.attn2.to_q"), &format!("{t}.attn2.to_k"), &format!("{t}.attn2.to_v")])?;
            if qk_norm {
                c.take(&format!("{s}.x_block.attn2.ln_q.weight"), &format!("{t}.attn2.norm_q.weight"))?;
                c.take(&format!("{s}.x_block.attn2.ln_k.weight"), &format!("{t}.attn2.norm_k.weight"))?;
            }
            c.linear(&format!("{s}.x_block.attn2.proj"), &format!("{t}.attn2.to_out.0"))?;
        }
        c.linear(&format!("{s}.x_block.adaLN_modulation.1"), &format!("{t}.norm1.linear"))?;
        if last {
            c.swapped(&format!("{s}.context_block.adaLN_modulation.1"), &format!("{t}.norm1_context.linear"))?;
        } else {
            c.linear(&format!("{s}.context_block.adaLN_modulation.1"), &format!("{t}.norm1_context.linear"))?;
        }
        c.linear(&format!("{s}.x_block.mlp.fc1"), &format!("{t}.ff.net.0.proj"))?;
        c.linear(&format!("{s}.x_block.mlp.fc2"), &format!("{t}.ff.net.2"))?;
        if !last {
            c.linear(&format!("{s}.context_block.mlp.fc1"), &format!("{t}.ff_context.net.0.proj"))?;
            c.linear(&format!("{s}.context_block.mlp.fc2"), &format!("{t}.ff_context.net.2"))?;
        }
    }
    c.linear("final_layer.linear", "proj_out")?;
    c.swapped("final_layer.adaLN_modulation.1", "norm_out.linear")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_splits_by_the_shapes() {
        let d = 64u64;
        let mut s: Vec<(String, Vec<u64>)> = vec![];
        let mut lin = |name: &str, out: u64, inp: u64| {
            s.push((format!("model.diffusion_model.{name}.weight"), vec![out, inp]));
            s.push((format!("model.diffusion_model.{name}.bias"), vec![out]));
        };
        for n in ["time_in.in_layer", "vector_in.in_layer", "guidance_in.in_layer"] {
            lin(n, d, 32);
        }
        for n in ["time_in.out_layer", "vector_in.out_layer", "guidance_in.out_layer", "txt_in", "img_in"] {
            lin(n, d, d);
        }
        for n in ["img_mod.lin", "txt_mod.lin"] {
            lin(&format!("double_blocks.0.{n}"), 6 * d, d);
        }
        for n in ["img_attn.qkv", "txt_attn.qkv"] {
            lin(&format!("double_blocks.0.{n}"), 3 * d, d);
        }
        for n in ["img_mlp.0", "txt_mlp.0"] {
            lin(&format!("double_blocks.0.{n}"), 4 * d, d);
        }
        for n in ["img_mlp.2", "txt_mlp.2"] {
            lin(&format!("double_blocks.0.{n}"), d, 4 * d);
        }
        for n in ["img_attn.proj", "txt_attn.proj"] {
            lin(&format!("double_blocks.0.{n}"), d, d);
        }
        lin("single_blocks.0.modulation.lin", 3 * d, d);
        lin("single_blocks.0.linear1", 7 * d, d);
        lin("single_blocks.0.linear2", d, 5 * d);
        lin("final_layer.linear", 16, d);
        lin("final_layer.adaLN_modulation.1", 2 * d, d);
        for n in ["double_blocks.0.img_attn", "double_blocks.0.txt_attn", "single_blocks.0"] {
            for q in ["query_norm", "key_norm"] {
                s.push((format!("model.diffusion_model.{n}.norm.{q}.scale"), vec![16]));
            }
        }
        let shapes: BTreeMap<String, Vec<u64>> = s.into_iter().collect();
        let m = to_diffusers(Family::Flux, &shapes).unwrap();
        let p = |k: &str| m.get(k).unwrap_or_else(|| panic!("{k}")).clone();
        assert_eq!(p("transformer_blocks.0.attn.to_k.weight"), Piece { source: "model.diffusion_model.double_blocks.0.img_attn.qkv.weight".into(), rows: Some((d, d)), swap_halves: false });
        assert_eq!(p("transformer_blocks.0.attn.add_v_proj.bias").rows, Some((2 * d, d)));
        assert_eq!(p("single_transformer_blocks.0.proj_mlp.weight").rows, Some((3 * d, 4 * d)));
        assert_eq!(p("single_transformer_blocks.0.attn.to_v.bias").rows, Some((2 * d, d)));
        assert!(p("norm_out.linear.weight").swap_halves && p("norm_out.linear.bias").swap_halves);
        assert_eq!(p("time_text_embed.guidance_embedder.linear_2.bias").source, "model.diffusion_model.guidance_in.out_layer.bias");
        assert_eq!(p("x_embedder.weight").rows, None);
        assert_eq!(m.len(), shapes.len() + 2 * 2 * 2 + 2 * 3, "qkv: 3 from 1 (x2 blocks, weight and bias); linear1: 4 from 1");

        // Missing, extra and unsplittable tensors are named.
        let mut bad = shapes.clone();
        bad.remove("model.diffusion_model.double_blocks.0.txt_mlp.2.bias");
        assert!(to_diffusers(Family::Flux, &bad).unwrap_err().contains("tensor `double_blocks.0.txt_mlp.2.bias` is missing"));
        let mut bad = shapes.clone();
        bad.insert("model.diffusion_model.extra.weight".into(), vec![4]);
        assert!(to_diffusers(Family::Flux, &bad).unwrap_err().contains("1 tensors are not part of a flux transformer: model.diffusion_model.extra.weight"));
        let mut bad = shapes.clone();
        bad.insert("model.diffusion_model.double_blocks.0.img_attn.qkv.weight".into(), vec![3 * d + 1, d]);
        assert!(to_diffusers(Family::Flux, &bad).unwrap_err().contains("not three equal q, k, v parts"));
    }

    #[test]
    fn sd3_last_block_is_pre_only() {
        let d = 32u64;
        let mut s = vec![("pos_embed".to_string(), vec![1, 64, d])];
        let mut lin = |name: &str, out: u64| {
            s.push((format!("{name}.weight"), vec![out, d]));
            s.push((format!("{name}.bias"), vec![out]));
        };
        for n in ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "context_embedder", "y_embedder.mlp.0", "y_embedder.mlp.2", "final_layer.linear"] {
            lin(n, d);
        }
        lin("final_layer.adaLN_modulation.1", 2 * d);
        for i in 0..2 {
            for b in ["x_block", "context_block"] {
                let pre_only = i == 1 && b == "context_block";
                lin(&format!("joint_blocks.{i}.{b}.attn.qkv"), 3 * d);
                lin(&format!("joint_blocks.{i}.{b}.adaLN_modulation.1"), if pre_only { 2 * d } else { 6 * d });
                if !pre_only {
                    lin(&format!("joint_blocks.{i}.{b}.attn.proj"), d);
                    lin(&format!("joint_blocks.{i}.{b}.mlp.fc1"), 4 * d);
                    lin(&format!("joint_blocks.{i}.{b}.mlp.fc2"), d);
                }
            }
        }
        lin("joint_blocks.0.x_block.attn2.qkv", 3 * d);
        lin("joint_blocks.0.x_block.attn2.proj", d);
        let shapes: BTreeMap<String, Vec<u64>> = s.into_iter().collect();
        let m = to_diffusers(Family::Sd3, &shapes).unwrap();
        assert!(m["transformer_blocks.1.norm1_context.linear.weight"].swap_halves);
        assert!(!m["transformer_blocks.0.norm1_context.linear.weight"].swap_halves);
        assert!(!m.contains_key("transformer_blocks.1.ff_context.net.0.proj.weight"));
        assert_eq!(m["transformer_blocks.0.attn2.to_v.weight"].rows, Some((2 * d, d)));
        assert_eq!(m["pos_embed.proj.bias"].source, "x_embedder.proj.bias");
        assert!(m["norm_out.linear.bias"].swap_halves);
    }
}

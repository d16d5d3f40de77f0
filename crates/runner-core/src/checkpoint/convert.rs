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

/// How an original tensor's rows are shared among the diffusers tensors it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// One diffusers tensor, the whole.
    Whole,
    /// `torch.chunk(3)`: q, k, v of equal rows.
    Thirds,
    /// FLUX's `linear1`: q, k, v of the model's width (img_in's rows), then the MLP.
    Linear1,
}

/// One tensor of the original layout and the diffusers tensors its rows hold, in order.
#[derive(Debug, Clone)]
struct Entry {
    original: String,
    parts: Vec<String>,
    rows: Rows,
    /// diffusers' `swap_scale_shift`.
    swap: bool,
}

/// The blocks and options a layout has, read off either naming.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Shape {
    /// FLUX: double blocks; SD3: joint blocks.
    blocks: usize,
    /// FLUX: single blocks.
    single: usize,
    /// FLUX-dev's guidance embedder.
    guidance: bool,
    /// SD3.5's blocks with a second attention.
    dual: Vec<usize>,
    /// SD3.5's q/k norms.
    qk_norm: bool,
}

fn layout(family: Family, sh: &Shape) -> Vec<Entry> {
    let mut out = vec![];
    let mut e = |original: String, parts: Vec<String>, rows: Rows, swap: bool| out.push(Entry { original, parts, rows, swap });
    // A Linear's weight and bias, or a fused projection's.
    let pair = |e: &mut dyn FnMut(String, Vec<String>, Rows, bool), from: &str, to: &[String], rows: Rows, swap: bool| {
        for part in ["weight", "bias"] {
            e(format!("{from}.{part}"), to.iter().map(|t| format!("{t}.{part}")).collect(), rows, swap);
        }
    };
    let one = |t: &str| vec![t.to_string()];
    let three = |t: &str, names: [&str; 3]| names.iter().map(|n| format!("{t}.{n}")).collect::<Vec<_>>();
    match family {
        Family::Flux => {
            pair(&mut e, "time_in.in_layer", &one("time_text_embed.timestep_embedder.linear_1"), Rows::Whole, false);
            pair(&mut e, "time_in.out_layer", &one("time_text_embed.timestep_embedder.linear_2"), Rows::Whole, false);
            pair(&mut e, "vector_in.in_layer", &one("time_text_embed.text_embedder.linear_1"), Rows::Whole, false);
            pair(&mut e, "vector_in.out_layer", &one("time_text_embed.text_embedder.linear_2"), Rows::Whole, false);
            if sh.guidance {
                pair(&mut e, "guidance_in.in_layer", &one("time_text_embed.guidance_embedder.linear_1"), Rows::Whole, false);
                pair(&mut e, "guidance_in.out_layer", &one("time_text_embed.guidance_embedder.linear_2"), Rows::Whole, false);
            }
            pair(&mut e, "txt_in", &one("context_embedder"), Rows::Whole, false);
            pair(&mut e, "img_in", &one("x_embedder"), Rows::Whole, false);
            for i in 0..sh.blocks {
                let (s, t) = (format!("double_blocks.{i}"), format!("transformer_blocks.{i}"));
                pair(&mut e, &format!("{s}.img_mod.lin"), &one(&format!("{t}.norm1.linear")), Rows::Whole, false);
                pair(&mut e, &format!("{s}.txt_mod.lin"), &one(&format!("{t}.norm1_context.linear")), Rows::Whole, false);
                pair(&mut e, &format!("{s}.img_attn.qkv"), &three(&t, ["attn.to_q", "attn.to_k", "attn.to_v"]), Rows::Thirds, false);
                pair(&mut e, &format!("{s}.txt_attn.qkv"), &three(&t, ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]), Rows::Thirds, false);
                for (from, to) in [
                    ("img_attn.norm.query_norm", "attn.norm_q"),
                    ("img_attn.norm.key_norm", "attn.norm_k"),
                    ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                    ("txt_attn.norm.key_norm", "attn.norm_added_k"),
                ] {
                    e(format!("{s}.{from}.scale"), one(&format!("{t}.{to}.weight")), Rows::Whole, false);
                }
                for (from, to) in [
                    ("img_mlp.0", "ff.net.0.proj"),
                    ("img_mlp.2", "ff.net.2"),
                    ("txt_mlp.0", "ff_context.net.0.proj"),
                    ("txt_mlp.2", "ff_context.net.2"),
                    ("img_attn.proj", "attn.to_out.0"),
                    ("txt_attn.proj", "attn.to_add_out"),
                ] {
                    pair(&mut e, &format!("{s}.{from}"), &one(&format!("{t}.{to}")), Rows::Whole, false);
                }
            }
            for i in 0..sh.single {
                let (s, t) = (format!("single_blocks.{i}"), format!("single_transformer_blocks.{i}"));
                pair(&mut e, &format!("{s}.modulation.lin"), &one(&format!("{t}.norm.linear")), Rows::Whole, false);
                let parts: Vec<String> = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"].iter().map(|n| format!("{t}.{n}")).collect();
                pair(&mut e, &format!("{s}.linear1"), &parts, Rows::Linear1, false);
                e(format!("{s}.norm.query_norm.scale"), one(&format!("{t}.attn.norm_q.weight")), Rows::Whole, false);
                e(format!("{s}.norm.key_norm.scale"), one(&format!("{t}.attn.norm_k.weight")), Rows::Whole, false);
                pair(&mut e, &format!("{s}.linear2"), &one(&format!("{t}.proj_out")), Rows::Whole, false);
            }
            pair(&mut e, "final_layer.linear", &one("proj_out"), Rows::Whole, false);
            pair(&mut e, "final_layer.adaLN_modulation.1", &one("norm_out.linear"), Rows::Whole, true);
        }
        Family::Sd3 => {
            e("pos_embed".into(), one("pos_embed.pos_embed"), Rows::Whole, false);
            pair(&mut e, "x_embedder.proj", &one("pos_embed.proj"), Rows::Whole, false);
            pair(&mut e, "t_embedder.mlp.0", &one("time_text_embed.timestep_embedder.linear_1"), Rows::Whole, false);
            pair(&mut e, "t_embedder.mlp.2", &one("time_text_embed.timestep_embedder.linear_2"), Rows::Whole, false);
            pair(&mut e, "context_embedder", &one("context_embedder"), Rows::Whole, false);
            pair(&mut e, "y_embedder.mlp.0", &one("time_text_embed.text_embedder.linear_1"), Rows::Whole, false);
            pair(&mut e, "y_embedder.mlp.2", &one("time_text_embed.text_embedder.linear_2"), Rows::Whole, false);
            for i in 0..sh.blocks {
                let (s, t) = (format!("joint_blocks.{i}"), format!("transformer_blocks.{i}"));
                let last = i + 1 == sh.blocks; // its context block is pre-only: no output projection, no MLP
                pair(&mut e, &format!("{s}.x_block.attn.qkv"), &three(&t, ["attn.to_q", "attn.to_k", "attn.to_v"]), Rows::Thirds, false);
                pair(&mut e, &format!("{s}.context_block.attn.qkv"), &three(&t, ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]), Rows::Thirds, false);
                if sh.qk_norm {
                    for (from, to) in
                        [("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"), ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k")]
                    {
                        e(format!("{s}.{from}.weight"), one(&format!("{t}.{to}.weight")), Rows::Whole, false);
                    }
                }
                pair(&mut e, &format!("{s}.x_block.attn.proj"), &one(&format!("{t}.attn.to_out.0")), Rows::Whole, false);
                if !last {
                    pair(&mut e, &format!("{s}.context_block.attn.proj"), &one(&format!("{t}.attn.to_add_out")), Rows::Whole, false);
                }
                if sh.dual.contains(&i) {
                    pair(&mut e, &format!("{s}.x_block.attn2.qkv"), &three(&t, ["attn2.to_q", "attn2.to_k", "attn2.to_v"]), Rows::Thirds, false);
                    if sh.qk_norm {
                        e(format!("{s}.x_block.attn2.ln_q.weight"), one(&format!("{t}.attn2.norm_q.weight")), Rows::Whole, false);
                        e(format!("{s}.x_block.attn2.ln_k.weight"), one(&format!("{t}.attn2.norm_k.weight")), Rows::Whole, false);
                    }
                    pair(&mut e, &format!("{s}.x_block.attn2.proj"), &one(&format!("{t}.attn2.to_out.0")), Rows::Whole, false);
                }
                pair(&mut e, &format!("{s}.x_block.adaLN_modulation.1"), &one(&format!("{t}.norm1.linear")), Rows::Whole, false);
                pair(&mut e, &format!("{s}.context_block.adaLN_modulation.1"), &one(&format!("{t}.norm1_context.linear")), Rows::Whole, last);
                pair(&mut e, &format!("{s}.x_block.mlp.fc1"), &one(&format!("{t}.ff.net.0.proj")), Rows::Whole, false);
                pair(&mut e, &format!("{s}.x_block.mlp.fc2"), &one(&format!("{t}.ff.net.2")), Rows::Whole, false);
                if !last {
                    pair(&mut e, &format!("{s}.context_block.mlp.fc1"), &one(&format!("{t}.ff_context.net.0.proj")), Rows::Whole, false);
                    pair(&mut e, &format!("{s}.context_block.mlp.fc2"), &one(&format!("{t}.ff_context.net.2")), Rows::Whole, false);
                }
            }
            pair(&mut e, "final_layer.linear", &one("proj_out"), Rows::Whole, false);
            pair(&mut e, "final_layer.adaLN_modulation.1", &one("norm_out.linear"), Rows::Whole, true);
        }
    }
    out
}

/// One more than the largest block index under `prefix` (`double_blocks.`), 0 if none.
fn count<'a>(names: impl Iterator<Item = &'a str>, prefix: &str) -> usize {
    names.filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).map(|i| i + 1).max().unwrap_or(0)
}

/// The diffusers tensors of an original-named transformer: diffusers name -> [`Piece`]. `shapes`
/// maps every tensor of the file (torch-order shapes). Errors name a missing tensor, one whose
/// rows cannot be split as the layout needs, or tensors the conversion does not use.
pub fn to_diffusers(family: Family, shapes: &BTreeMap<String, Vec<u64>>) -> Result<BTreeMap<String, Piece>, String> {
    let mut src: BTreeMap<String, (String, Vec<u64>)> = shapes.iter().map(|(k, v)| (strip_prefix(k).to_string(), (k.clone(), v.clone()))).collect();
    let names = || src.keys().map(String::as_str);
    let sh = match family {
        Family::Flux => Shape { blocks: count(names(), "double_blocks."), single: count(names(), "single_blocks."), guidance: src.contains_key("guidance_in.in_layer.weight"), ..Shape::default() },
        Family::Sd3 => {
            let blocks = count(names(), "joint_blocks.");
            Shape {
                blocks,
                dual: (0..blocks).filter(|i| names().any(|k| k.starts_with(&format!("joint_blocks.{i}.x_block.attn2.")))).collect(),
                qk_norm: names().any(|k| k.contains("ln_q")),
                ..Shape::default()
            }
        }
    };
    // FLUX's width, for linear1's split: img_in's rows (diffusers hard-codes 3072).
    let inner = src.get("img_in.weight").and_then(|(_, s)| s.first().copied());
    let mut out = BTreeMap::new();
    for entry in layout(family, &sh) {
        let (source, shape) = src.remove(&entry.original).ok_or_else(|| format!("tensor `{}` is missing", entry.original))?;
        let rows = shape.first().copied().unwrap_or(0);
        let sizes: Vec<u64> = match entry.rows {
            Rows::Whole => vec![rows],
            Rows::Thirds if rows % 3 == 0 => vec![rows / 3; 3],
            Rows::Thirds => return Err(format!("tensor `{source}` has {rows} rows: not three equal q, k, v parts")),
            Rows::Linear1 => match inner {
                Some(d) if rows > 3 * d => vec![d, d, d, rows - 3 * d],
                _ => return Err(format!("tensor `{source}` has {rows} rows: not q, k, v of img_in's width and an MLP")),
            },
        };
        if entry.swap && rows % 2 != 0 {
            return Err(format!("tensor `{source}` has {rows} rows: not two equal shift, scale halves"));
        }
        let mut at = 0;
        for (part, n) in entry.parts.into_iter().zip(sizes) {
            let rows = (entry.rows != Rows::Whole).then_some((at, n));
            out.insert(part, Piece { source: source.clone(), rows, swap_halves: entry.swap });
            at += n;
        }
    }
    if !src.is_empty() {
        let left: Vec<&str> = src.values().map(|(k, _)| k.as_str()).take(5).collect();
        return Err(format!("{} tensors are not part of a {} transformer: {}{}", src.len(), family.as_str(), left.join(", "), if src.len() > 5 { ", ..." } else { "" }));
    }
    Ok(out)
}

/// The original tensors of a diffusers-named transformer, in the original checkpoint's order:
/// (original name, the diffusers tensors whose rows it concatenates, swap the halves). The
/// inverse of [`to_diffusers`]; errors name a diffusers tensor the layout has no place for, or
/// one it needs that is missing.
pub fn from_diffusers(family: Family, names: &[&str]) -> Result<Vec<(String, Vec<String>, bool)>, String> {
    let it = || names.iter().copied();
    let sh = match family {
        Family::Flux => Shape {
            blocks: count(it(), "transformer_blocks."),
            single: count(it(), "single_transformer_blocks."),
            guidance: it().any(|n| n.starts_with("time_text_embed.guidance_embedder.")),
            ..Shape::default()
        },
        Family::Sd3 => {
            let blocks = count(it(), "transformer_blocks.");
            Shape {
                blocks,
                dual: (0..blocks).filter(|i| it().any(|n| n.starts_with(&format!("transformer_blocks.{i}.attn2.")))).collect(),
                qk_norm: it().any(|n| n.contains(".norm_q.")),
                ..Shape::default()
            }
        }
    };
    let entries = layout(family, &sh);
    let mut unused: std::collections::BTreeSet<&str> = it().collect();
    for e in &entries {
        for p in &e.parts {
            if !unused.remove(p.as_str()) {
                return Err(format!("tensor `{p}` is missing"));
            }
        }
    }
    if let Some(n) = unused.first() {
        return Err(format!("{} tensors have no place in the original {} layout: {n}{}", unused.len(), family.as_str(), if unused.len() > 1 { ", ..." } else { "" }));
    }
    Ok(entries.into_iter().map(|e| (e.original, e.parts, e.swap)).collect())
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

//! Module trees from tensor names alone: per-module bytes, diffusers' no-split units, groups
//! (for group offload), and an execution order for splitting a component across devices.
//!
//! A tensor `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight` belongs to the
//! leaf module `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`; its *unit* is the
//! shortest enclosing no-split module (here the `BasicTransformerBlock`
//! `down_blocks.1.attentions.0.transformer_blocks.0`), or its leaf module when none encloses it.
//! The classes runner splits ([`SPLITTABLE_CLASSES`]) and their no-split units (their
//! `_no_split_modules`): `UNet2DConditionModel` (BasicTransformerBlock, ResnetBlock2D,
//! CrossAttnUpBlock2D, UpBlock2D), `SD3Transformer2DModel` (`transformer_blocks.{i}`,
//! JointTransformerBlock), `FluxTransformer2DModel` (`transformer_blocks.{i}`,
//! FluxTransformerBlock; `single_transformer_blocks.{i}`, FluxSingleTransformerBlock) and
//! `T5EncoderModel` (`encoder.block.{i}`, T5Block); other components are one unit (placed whole). Everything is linear in the number of tensors plus a sort.

use std::collections::HashMap;

use serde::Serialize;

/// One indivisible piece of a component for placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unit {
    /// Module path (empty for parameters of the root module).
    pub path: String,
    pub bytes: u64,
    /// The diffusers class that makes it a no-split unit, when it is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
}

/// A component's module structure as far as placement needs it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModuleTree {
    /// Units in execution order.
    pub units: Vec<Unit>,
    /// Bytes of the largest leaf module (what sequential offload streams at once).
    pub largest_leaf: u64,
    pub largest_leaf_path: String,
    /// Offload groups in execution order: (path, bytes).
    pub groups: Vec<(String, u64)>,
    pub total: u64,
}

impl ModuleTree {
    pub fn largest_unit(&self) -> u64 {
        self.units.iter().map(|u| u.bytes).max().unwrap_or(0)
    }
    pub fn largest_group(&self) -> u64 {
        self.groups.iter().map(|g| g.1).max().unwrap_or(0)
    }
}

fn is_index(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The classes whose module trees are split into no-split units, so that `auto` may split them
/// across devices.
pub const SPLITTABLE_CLASSES: [&str; 4] = ["UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "T5EncoderModel"];

/// The no-split unit (prefix length, class) enclosing a module path of a `class` model, for the
/// [`SPLITTABLE_CLASSES`].
fn no_split_unit(class: &str, segs: &[&str], up_block_types: &[String]) -> Option<(usize, &'static str)> {
    match class {
        "UNet2DConditionModel" => unet_unit(segs, up_block_types),
        // diffusers' `SD3Transformer2DModel._no_split_modules`: one joint block each.
        "SD3Transformer2DModel" => (segs.len() >= 2 && segs[0] == "transformer_blocks" && is_index(segs[1])).then_some((2, "JointTransformerBlock")),
        // diffusers' `FluxTransformer2DModel._no_split_modules`: one double or single block each.
        "FluxTransformer2DModel" => match segs {
            ["transformer_blocks", i, ..] if is_index(i) => Some((2, "FluxTransformerBlock")),
            ["single_transformer_blocks", i, ..] if is_index(i) => Some((2, "FluxSingleTransformerBlock")),
            _ => None,
        },
        // transformers' `T5EncoderModel._no_split_modules`.
        "T5EncoderModel" => (segs.len() >= 3 && segs[0] == "encoder" && segs[1] == "block" && is_index(segs[2])).then_some((3, "T5Block")),
        _ => None,
    }
}

/// The no-split unit (prefix length, class) enclosing a module path, for diffusers'
/// `UNet2DConditionModel._no_split_modules` (BasicTransformerBlock, ResnetBlock2D,
/// CrossAttnUpBlock2D, UpBlock2D).
fn unet_unit(segs: &[&str], up_block_types: &[String]) -> Option<(usize, &'static str)> {
    if segs.len() >= 2 && segs[0] == "up_blocks" && is_index(segs[1]) {
        let i: usize = segs[1].parse().ok()?;
        match up_block_types.get(i).map(String::as_str) {
            Some("CrossAttnUpBlock2D") => return Some((2, "CrossAttnUpBlock2D")),
            Some("UpBlock2D") => return Some((2, "UpBlock2D")),
            _ => {}
        }
    }
    for i in 0..segs.len().saturating_sub(1) {
        if segs[i] == "resnets" && is_index(segs[i + 1]) {
            return Some((i + 2, "ResnetBlock2D"));
        }
        if segs[i] == "transformer_blocks" && is_index(segs[i + 1]) {
            return Some((i + 2, "BasicTransformerBlock"));
        }
    }
    None
}

/// The offload group of a module path: one block of a block list (`down_blocks.1`,
/// `text_model.encoder.layers.3`, SD3's and FLUX's `transformer_blocks.7`, FLUX's
/// `single_transformer_blocks.20`, T5's `encoder.block.5`), else
/// the first module below wrapper modules (`mid_block`, `text_model.embeddings`,
/// `encoder.conv_in`).
fn group_of(segs: &[&str]) -> usize {
    for i in 0..segs.len().saturating_sub(1) {
        if matches!(segs[i], "down_blocks" | "up_blocks" | "layers") && is_index(segs[i + 1]) {
            return i + 2;
        }
    }
    // Top-level block lists only: a UNet's `mid_block.attentions.0.transformer_blocks.0` stays
    // in its `mid_block` group.
    if segs.len() >= 2 && matches!(segs[0], "transformer_blocks" | "single_transformer_blocks") && is_index(segs[1]) {
        return 2;
    }
    if segs.len() >= 3 && segs[0] == "encoder" && segs[1] == "block" && is_index(segs[2]) {
        return 3;
    }
    let wrappers = ["text_model", "vision_model", "encoder", "decoder"];
    let skip = segs.iter().take_while(|s| wrappers.contains(s)).count();
    (skip + 1).min(segs.len())
}

/// The offload group of the module that holds tensor `name` (what `group` offload streams).
pub fn group_path(name: &str) -> String {
    let module = name.rsplit_once('.').map_or("", |(m, _)| m);
    let segs: Vec<&str> = if module.is_empty() { vec![] } else { module.split('.').collect() };
    segs[..group_of(&segs)].join(".")
}

/// `group_blocks = n`: the group holding block group `group` (a [`group_path`]). Blocks of one
/// block list go in chunks of `n` consecutive indices (diffusers' `num_blocks_per_group`), the
/// chunk named by its first block (`down_blocks.2` holds blocks 2 and 3 for n = 2); other groups
/// (embeddings, `mid_block`, norms) stay on their own.
pub fn block_chunk(group: &str, n: u32) -> String {
    if n <= 1 {
        return group.to_string();
    }
    match group.rsplit_once('.') {
        Some((list, i)) if is_index(i) => {
            let i: u64 = i.parse().unwrap_or(0);
            format!("{list}.{}", i - i % n as u64)
        }
        _ => group.to_string(),
    }
}

/// How a chunk of blocks reads: `down_blocks.2-3` (its first and last block), or the group's
/// own path when it holds one.
pub fn chunk_label(members: &[&str]) -> String {
    match (members.first(), members.last()) {
        (Some(a), Some(b)) if a != b => format!("{a}-{}", b.rsplit_once('.').map_or(*b, |(_, i)| i)),
        (Some(a), _) => a.to_string(),
        _ => String::new(),
    }
}

/// `groups` (in execution order) merged into chunks of `n` blocks ([`block_chunk`]), labelled by
/// [`chunk_label`], in execution order.
pub fn merge_groups(groups: &[(String, u64)], n: u32) -> Vec<(String, u64)> {
    if n <= 1 {
        return groups.to_vec();
    }
    let mut out: Vec<(String, Vec<&str>, u64)> = vec![];
    for (g, bytes) in groups {
        let key = block_chunk(g, n);
        match out.iter_mut().find(|o| o.0 == key) {
            Some(o) => {
                o.1.push(g);
                o.2 += bytes;
            }
            None => out.push((key, vec![g], *bytes)),
        }
    }
    out.into_iter().map(|(_, members, bytes)| (chunk_label(&members), bytes)).collect()
}

/// Sorts module paths into execution order (as the plan orders units and groups).
pub fn sort_in_execution_order(paths: &mut [String]) {
    paths.sort_by_cached_key(|p| exec_key(p));
}

/// Execution-order sort key of a module path (UNet2DConditionModel's forward: embeddings, down
/// blocks with resnets and attentions interleaved, mid block, up blocks, output;
/// SD3Transformer2DModel's: pos_embed, time_text_embed, context_embedder, transformer_blocks,
/// norm_out, proj_out; FluxTransformer2DModel's: x_embedder, time_text_embed (timestep,
/// guidance, text), context_embedder, transformer_blocks, single_transformer_blocks, norm_out,
/// proj_out; T5EncoderModel's: shared, encoder.block, encoder.final_layer_norm).
/// Unknown names sort after known ones, alphabetically; indices numerically.
fn exec_key(path: &str) -> Vec<(u32, u64, String)> {
    let segs: Vec<&str> = if path.is_empty() { vec![] } else { path.split('.').collect() };
    let mut key = Vec::with_capacity(segs.len());
    let mut i = 0;
    while i < segs.len() {
        let s = segs[i];
        let next_index = segs.get(i + 1).filter(|n| is_index(n)).and_then(|n| n.parse::<u64>().ok());
        match (s, next_index) {
            ("resnets", Some(j)) => {
                key.push((0, 2 * j, String::new()));
                i += 2;
                continue;
            }
            ("attentions", Some(j)) => {
                key.push((0, 2 * j + 1, String::new()));
                i += 2;
                continue;
            }
            _ => {}
        }
        if is_index(s) {
            key.push((0, s.parse().unwrap_or(u64::MAX), String::new()));
        } else {
            // Only siblings are compared: ranks order the children of one module.
            let rank = match s {
                "conv_in" | "norm" | "embeddings" | "pos_embed" | "shared" | "x_embedder" => 0,
                "time_proj" | "proj_in" | "timestep_embedder" => 10,
                // FLUX: guidance before text (ties sort by name).
                "guidance_embedder" | "text_embedder" => 11,
                "time_text_embed" => 12,
                "context_embedder" => 15,
                "time_embedding" | "transformer_blocks" => 20,
                "single_transformer_blocks" => 21,
                "norm_out" => 25,
                "class_embedding" | "proj_out" => 30,
                "add_time_proj" => 40,
                "add_embedding" => 50,
                "encoder_hid_proj" => 60,
                "down_blocks" | "encoder" | "block" => 100,
                "mid_block" => 110,
                "up_blocks" => 120,
                "quant_conv" => 130,
                "post_quant_conv" => 140,
                "decoder" => 150,
                "conv_norm_out" | "final_layer_norm" => 200,
                "conv_act" => 210,
                "conv_out" => 220,
                "downsamplers" | "upsamplers" => 10000,
                _ => 5000,
            };
            key.push((rank, 0, s.to_string()));
        }
        i += 1;
    }
    key
}

/// Builds the tree of a component from `(tensor name, bytes at the target dtype)`.
/// `class` is the diffusers/transformers class; `up_block_types` the UNet config's (empty for
/// other classes).
pub fn build(class: &str, up_block_types: &[String], tensors: &[(String, u64)]) -> ModuleTree {
    let splittable = SPLITTABLE_CLASSES.contains(&class);
    let mut units: HashMap<String, (u64, Option<&'static str>)> = HashMap::new();
    let mut leaves: HashMap<&str, u64> = HashMap::new();
    let mut groups: HashMap<String, u64> = HashMap::new();
    let mut total = 0;
    for (name, bytes) in tensors {
        total += bytes;
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        *leaves.entry(module).or_default() += bytes;
        let segs: Vec<&str> = if module.is_empty() { vec![] } else { module.split('.').collect() };
        let (unit_path, unit_class) = if splittable {
            match no_split_unit(class, &segs, up_block_types) {
                Some((n, c)) => (segs[..n].join("."), Some(c)),
                None => (module.to_string(), None),
            }
        } else {
            (String::new(), None) // placed whole: one unit
        };
        let e = units.entry(unit_path).or_insert((0, unit_class));
        e.0 += bytes;
        *groups.entry(segs[..group_of(&segs)].join(".")).or_default() += bytes;
    }
    let (largest_leaf_path, largest_leaf) = leaves.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))).map(|(p, b)| (p.to_string(), *b)).unwrap_or_default();
    let mut units: Vec<Unit> = units.into_iter().map(|(path, (bytes, class))| Unit { path, bytes, class }).collect();
    units.sort_by_cached_key(|u| exec_key(&u.path));
    let mut groups: Vec<(String, u64)> = groups.into_iter().collect();
    groups.sort_by_cached_key(|g| exec_key(&g.0));
    ModuleTree { units, largest_leaf, largest_leaf_path, groups, total }
}

/// Compresses a per-unit device assignment (in execution order) into the shortest module map
/// that keeps that order: a module whose units all sit on one device, consecutively, is listed
/// once (accelerate's `hf_device_map` shape). Linear in the number of units times depth.
pub fn compress<D: Clone + PartialEq>(assign: &[(String, D)]) -> Vec<(String, D)> {
    fn rec<D: Clone + PartialEq>(prefix: &str, items: &[(Vec<&str>, D)], depth: usize, allow_whole: bool, out: &mut Vec<(String, D)>) {
        if allow_whole && items.iter().all(|(_, d)| *d == items[0].1) {
            out.push((prefix.to_string(), items[0].1.clone()));
            return;
        }
        // Runs of consecutive items sharing the next segment.
        let mut runs: Vec<(Option<&str>, usize, usize)> = vec![];
        for (i, (segs, _)) in items.iter().enumerate() {
            let seg = segs.get(depth).copied();
            match runs.last_mut() {
                Some((s, _, end)) if *s == seg && seg.is_some() => *end = i + 1,
                _ => runs.push((seg, i, i + 1)),
            }
        }
        let mut count: HashMap<Option<&str>, usize> = HashMap::new();
        for r in &runs {
            *count.entry(r.0).or_default() += 1;
        }
        for (seg, start, end) in runs {
            match seg {
                // The module's own parameters.
                None => out.push((prefix.to_string(), items[start].1.clone())),
                Some(s) => {
                    let p = if prefix.is_empty() { s.to_string() } else { format!("{prefix}.{s}") };
                    // A module split into several runs cannot be named whole.
                    rec(&p, &items[start..end], depth + 1, count[&seg] == 1, out);
                }
            }
        }
    }
    let items: Vec<(Vec<&str>, D)> = assign.iter().map(|(p, d)| (if p.is_empty() { vec![] } else { p.split('.').collect() }, d.clone())).collect();
    let mut out = vec![];
    if !items.is_empty() {
        rec("", &items, 0, true, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(names: &[&str]) -> Vec<(String, u64)> {
        names.iter().map(|n| (n.to_string(), 10)).collect()
    }

    #[test]
    fn unet_units_and_order() {
        let cfg = ["CrossAttnUpBlock2D".to_string(), "UpBlock2D".to_string()];
        let tree = build(
            "UNet2DConditionModel",
            &cfg,
            &t(&[
                "up_blocks.1.resnets.0.conv1.weight",
                "up_blocks.0.attentions.0.proj_in.weight",
                "conv_out.weight",
                "mid_block.resnets.1.conv1.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                "mid_block.attentions.0.proj_in.weight",
                "mid_block.resnets.0.conv1.weight",
                "down_blocks.10.resnets.0.conv1.weight",
                "down_blocks.2.downsamplers.0.conv.weight",
                "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj.weight",
                "down_blocks.2.resnets.1.norm1.weight",
                "down_blocks.2.resnets.1.norm1.bias",
                "down_blocks.2.attentions.0.proj_in.weight",
                "down_blocks.2.resnets.0.conv1.weight",
                "time_embedding.linear_1.weight",
                "add_embedding.linear_1.weight",
                "conv_in.weight",
            ]),
        );
        let paths: Vec<&str> = tree.units.iter().map(|u| u.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "conv_in",
                "time_embedding.linear_1",
                "add_embedding.linear_1",
                "down_blocks.2.resnets.0",
                "down_blocks.2.attentions.0.proj_in",
                "down_blocks.2.resnets.1",
                "down_blocks.2.attentions.1.transformer_blocks.0",
                "down_blocks.2.downsamplers.0.conv",
                "down_blocks.10.resnets.0",
                "mid_block.resnets.0",
                "mid_block.attentions.0.proj_in",
                "mid_block.attentions.0.transformer_blocks.0",
                "mid_block.resnets.1",
                "up_blocks.0",
                "up_blocks.1",
                "conv_out",
            ]
        );
        assert_eq!(tree.units.iter().find(|u| u.path == "down_blocks.2.resnets.1").unwrap().bytes, 20);
        assert_eq!(tree.units.iter().find(|u| u.path == "up_blocks.0").unwrap().class, Some("CrossAttnUpBlock2D"));
        let groups: Vec<&str> = tree.groups.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(groups, ["conv_in", "time_embedding", "add_embedding", "down_blocks.2", "down_blocks.10", "mid_block", "up_blocks.0", "up_blocks.1", "conv_out"]);
        assert_eq!(tree.total, 170);
    }

    #[test]
    fn other_components_are_one_unit_with_layer_groups() {
        let tree = build(
            "CLIPTextModel",
            &[],
            &t(&["text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.1.mlp.fc1.weight", "text_model.encoder.layers.0.mlp.fc1.weight", "text_model.final_layer_norm.weight"]),
        );
        assert_eq!(tree.units.len(), 1);
        assert_eq!(tree.units[0].bytes, 40);
        let groups: Vec<&str> = tree.groups.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(groups, ["text_model.embeddings", "text_model.encoder.layers.0", "text_model.encoder.layers.1", "text_model.final_layer_norm"]);
    }

    #[test]
    fn sd3_transformer_units_groups_and_order() {
        let names = [
            "proj_out.weight",
            "transformer_blocks.10.ff.net.0.proj.weight",
            "norm_out.linear.weight",
            "transformer_blocks.2.attn.to_q.weight",
            "transformer_blocks.2.norm1.linear.weight",
            "transformer_blocks.2.ff_context.net.2.bias",
            "context_embedder.weight",
            "time_text_embed.text_embedder.linear_1.weight",
            "time_text_embed.timestep_embedder.linear_1.weight",
            "pos_embed.proj.weight",
            "pos_embed.pos_embed",
            "transformer_blocks.0.attn.add_q_proj.weight",
        ];
        let tree = build("SD3Transformer2DModel", &[], &t(&names));
        let units: Vec<(&str, u64, Option<&str>)> = tree.units.iter().map(|u| (u.path.as_str(), u.bytes, u.class)).collect();
        assert_eq!(
            units,
            [
                ("pos_embed", 10, None),
                ("pos_embed.proj", 10, None),
                ("time_text_embed.timestep_embedder.linear_1", 10, None),
                ("time_text_embed.text_embedder.linear_1", 10, None),
                ("context_embedder", 10, None),
                ("transformer_blocks.0", 10, Some("JointTransformerBlock")),
                ("transformer_blocks.2", 30, Some("JointTransformerBlock")),
                ("transformer_blocks.10", 10, Some("JointTransformerBlock")),
                ("norm_out.linear", 10, None),
                ("proj_out", 10, None),
            ]
        );
        // Group offload streams one joint block at a time, not all of `transformer_blocks`.
        let groups: Vec<(&str, u64)> = tree.groups.iter().map(|g| (g.0.as_str(), g.1)).collect();
        assert_eq!(
            groups,
            [
                ("pos_embed", 20),
                ("time_text_embed", 20),
                ("context_embedder", 10),
                ("transformer_blocks.0", 10),
                ("transformer_blocks.2", 30),
                ("transformer_blocks.10", 10),
                ("norm_out", 10),
                ("proj_out", 10)
            ]
        );
        assert_eq!(group_path("transformer_blocks.7.attn.to_k.weight"), "transformer_blocks.7");
        // A UNet's transformer blocks stay in their block's group.
        assert_eq!(group_path("mid_block.attentions.0.transformer_blocks.3.attn1.to_q.weight"), "mid_block");
        let unet = build("UNet2DConditionModel", &[], &t(&["mid_block.attentions.0.transformer_blocks.3.attn1.to_q.weight"]));
        assert_eq!(unet.units[0].class, Some("BasicTransformerBlock"));
    }

    #[test]
    fn group_blocks_merge_consecutive_blocks_of_a_list() {
        assert_eq!(block_chunk("down_blocks.3", 2), "down_blocks.2");
        assert_eq!(block_chunk("text_model.encoder.layers.5", 4), "text_model.encoder.layers.4");
        assert_eq!(block_chunk("mid_block", 2), "mid_block");
        assert_eq!(block_chunk("down_blocks.3", 1), "down_blocks.3");
        let g = |p: &str, b: u64| (p.to_string(), b);
        let groups = [g("conv_in", 1), g("down_blocks.0", 10), g("down_blocks.1", 20), g("down_blocks.2", 30), g("mid_block", 5), g("up_blocks.0", 7), g("up_blocks.1", 8), g("conv_out", 1)];
        assert_eq!(merge_groups(&groups, 2), [g("conv_in", 1), g("down_blocks.0-1", 30), g("down_blocks.2", 30), g("mid_block", 5), g("up_blocks.0-1", 15), g("conv_out", 1)]);
        assert_eq!(merge_groups(&groups, 1), groups);
    }

    #[test]
    fn t5_units_groups_and_order() {
        let names = [
            "encoder.final_layer_norm.weight",
            "encoder.block.11.layer.1.DenseReluDense.wo.weight",
            "encoder.block.2.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
            "shared.weight",
        ];
        let tree = build("T5EncoderModel", &[], &t(&names));
        let units: Vec<(&str, u64, Option<&str>)> = tree.units.iter().map(|u| (u.path.as_str(), u.bytes, u.class)).collect();
        assert_eq!(
            units,
            [
                ("shared", 10, None),
                ("encoder.block.0", 20, Some("T5Block")),
                ("encoder.block.2", 10, Some("T5Block")),
                ("encoder.block.11", 10, Some("T5Block")),
                ("encoder.final_layer_norm", 10, None),
            ]
        );
        let groups: Vec<&str> = tree.groups.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(groups, ["shared", "encoder.block.0", "encoder.block.2", "encoder.block.11", "encoder.final_layer_norm"]);
        // Other transformers models stay one unit.
        assert_eq!(build("CLIPTextModelWithProjection", &[], &t(&["text_model.encoder.layers.0.mlp.fc1.weight", "text_projection.weight"])).units.len(), 1);
    }

    #[test]
    fn flux_units_groups_and_order() {
        let names = [
            "proj_out.weight",
            "single_transformer_blocks.10.proj_mlp.weight",
            "single_transformer_blocks.2.attn.to_q.weight",
            "single_transformer_blocks.2.norm.linear.weight",
            "norm_out.linear.weight",
            "transformer_blocks.1.ff_context.net.2.weight",
            "transformer_blocks.0.attn.add_k_proj.weight",
            "transformer_blocks.0.norm1.linear.weight",
            "context_embedder.weight",
            "time_text_embed.text_embedder.linear_1.weight",
            "time_text_embed.guidance_embedder.linear_1.weight",
            "time_text_embed.timestep_embedder.linear_1.weight",
            "x_embedder.weight",
        ];
        let tree = build("FluxTransformer2DModel", &[], &t(&names));
        let units: Vec<(&str, u64, Option<&str>)> = tree.units.iter().map(|u| (u.path.as_str(), u.bytes, u.class)).collect();
        assert_eq!(
            units,
            [
                ("x_embedder", 10, None),
                ("time_text_embed.timestep_embedder.linear_1", 10, None),
                ("time_text_embed.guidance_embedder.linear_1", 10, None),
                ("time_text_embed.text_embedder.linear_1", 10, None),
                ("context_embedder", 10, None),
                ("transformer_blocks.0", 20, Some("FluxTransformerBlock")),
                ("transformer_blocks.1", 10, Some("FluxTransformerBlock")),
                ("single_transformer_blocks.2", 20, Some("FluxSingleTransformerBlock")),
                ("single_transformer_blocks.10", 10, Some("FluxSingleTransformerBlock")),
                ("norm_out.linear", 10, None),
                ("proj_out", 10, None),
            ]
        );
        let groups: Vec<&str> = tree.groups.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(
            groups,
            [
                "x_embedder",
                "time_text_embed",
                "context_embedder",
                "transformer_blocks.0",
                "transformer_blocks.1",
                "single_transformer_blocks.2",
                "single_transformer_blocks.10",
                "norm_out",
                "proj_out"
            ]
        );
        assert_eq!(group_path("single_transformer_blocks.7.attn.norm_q.weight"), "single_transformer_blocks.7");
    }

    #[test]
    fn compress_map() {
        let a = |p: &str, d: u8| (p.to_string(), d);
        let m = compress(&[
            a("conv_in", 0),
            a("down_blocks.0.resnets.0", 0),
            a("down_blocks.0.resnets.1", 0),
            a("down_blocks.1.resnets.0", 0),
            a("down_blocks.1.resnets.1", 1),
            a("up_blocks.0", 1),
            a("conv_out", 1),
        ]);
        assert_eq!(m, vec![a("conv_in", 0), a("down_blocks.0", 0), a("down_blocks.1.resnets.0", 0), a("down_blocks.1.resnets.1", 1), a("up_blocks", 1), a("conv_out", 1)]);
        assert_eq!(compress(&[a("x", 0), a("y", 0)]), vec![a("", 0)]);
        // Interleaved siblings (resnets/attentions) keep execution order and are never merged
        // across the interleaving.
        let m = compress(&[a("mid.resnets.0", 0), a("mid.attentions.0.norm", 0), a("mid.attentions.0.proj", 1), a("mid.resnets.1", 1)]);
        assert_eq!(m, vec![a("mid.resnets.0", 0), a("mid.attentions.0.norm", 0), a("mid.attentions.0.proj", 1), a("mid.resnets.1", 1)]);
        let m = compress(&[a("mid.resnets.0", 0), a("mid.attentions.0", 0), a("mid.resnets.1", 0), a("up", 1)]);
        assert_eq!(m, vec![a("mid", 0), a("up", 1)]);
    }
}

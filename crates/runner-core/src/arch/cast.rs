//! Which layers diffusers' layerwise casting (`ModelMixin.enable_layerwise_casting`) converts:
//! the patterns both the planner (what the cast weights weigh) and the model code (which layers
//! cast as they run, [`crate::models::cast`]) read.

/// diffusers `DEFAULT_SKIP_MODULES_PATTERN` (`re.search` on each module path).
pub const DEFAULT_SKIP_MODULES_PATTERN: &[&str] = &["pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$"];

/// The diffusers models runner can cast layer by layer (`enable_layerwise_casting` is a
/// `ModelMixin` method: transformers' text encoders have none).
pub const CASTABLE_CLASSES: &[&str] = &["UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "AutoencoderKL"];

/// The model's `_skip_layerwise_casting_patterns` (its `_keep_in_fp32_modules` are `None` for
/// all four).
fn class_patterns(class: &str) -> &'static [&'static str] {
    match class {
        "UNet2DConditionModel" => &["norm"],
        "SD3Transformer2DModel" | "FluxTransformer2DModel" => &["pos_embed", "norm"],
        _ => &[],
    }
}

/// `re.search(pattern, path)` for the patterns above: `^x$` is equality, anything else a
/// substring.
fn matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_prefix('^').and_then(|p| p.strip_suffix('$')) {
        Some(exact) => path == exact,
        None => path.contains(pattern),
    }
}

/// Whether diffusers leaves module `path` of a `class` model (and all below it) uncast: its
/// recursion tests every prefix on the way down, so an ancestor's match skips the leaf too.
pub fn skipped(class: &str, path: &str) -> bool {
    let patterns = DEFAULT_SKIP_MODULES_PATTERN.iter().chain(class_patterns(class));
    let mut prefixes = path.match_indices('.').map(|(i, _)| &path[..i]).chain(std::iter::once(path));
    prefixes.any(|p| patterns.clone().any(|pat| matches(pat, p)))
}

/// The modules of a checkpoint that are cast: those owning a 2-D (`Linear`) or 4-D (`Conv2d`)
/// `weight`, not skipped. The planner's view of what the model code casts (the two agree on the
/// castable classes, tested on the fixtures).
pub fn cast_modules<'a>(class: &str, tensors: impl IntoIterator<Item = (&'a str, usize)>) -> std::collections::BTreeSet<String> {
    tensors.into_iter().filter_map(|(name, rank)| name.strip_suffix(".weight").filter(|m| matches!(rank, 2 | 4) && !skipped(class, m)).map(str::to_string)).collect()
}

/// Whether tensor `name` belongs to one of `modules` (its parent path is one).
pub fn is_cast(modules: &std::collections::BTreeSet<String>, name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(m, _)| modules.contains(m))
}

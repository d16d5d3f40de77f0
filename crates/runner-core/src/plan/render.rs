//! `runner plan` output: a table for people, JSON for machines.

use serde_json::json;

use super::{BudgetSource, Plan};
use crate::manifest::Offload;
use crate::units::ByteSize;

fn b(x: u64) -> String {
    ByteSize(x).to_string()
}

pub fn to_json(plan: &Plan, weights_only: bool) -> serde_json::Value {
    let components: serde_json::Map<String, serde_json::Value> = plan
        .components
        .iter()
        .map(|c| {
            let mut v = json!({
                "class": c.class,
                "dtype": c.dtype,
                "bytes": c.bytes,
                "working_bytes": c.working_bytes,
                "peak_bytes": c.peak_bytes,
                "device": c.device.to_string(),
                "offload": c.offload,
                "reason": c.reason,
            });
            if c.offload != crate::manifest::Offload::None {
                // Weight bytes on the device while it runs (all of them under `model`).
                v["streamed_bytes"] = c.streamed_bytes.into();
                v["offload_target"] = json!(c.offload_target);
            }
            if c.offload == crate::manifest::Offload::Group {
                v["group_blocks"] = c.group_blocks.into();
            }
            // Host RAM its weights take for the whole run (none when offloaded to disk).
            v["host_bytes"] = c.host_bytes.into();
            if c.scratch_bytes > 0 {
                v["scratch_bytes"] = c.scratch_bytes.into();
            }
            if let Some(o) = c.overflow {
                v["overflow"] = json!(o);
            }
            if let Some(split) = &c.split {
                v["split"] = split.iter().map(|(k, d)| (k.clone(), serde_json::Value::from(d.to_string()))).collect::<serde_json::Map<_, _>>().into();
                v["split_bytes"] = json!(c.split_bytes);
            }
            (c.name.clone(), v)
        })
        .collect();
    let devices: serde_json::Map<String, serde_json::Value> = plan
        .devices
        .iter()
        .map(|d| {
            (
                d.device.to_string(),
                json!({"budget": d.budget_bytes, "planned": d.planned_bytes, "resident": d.resident_bytes, "weight_peak": d.weight_peak_bytes, "free": d.free_bytes, "source": d.source}),
            )
        })
        .collect();
    json!({
        "strategy": plan.strategy,
        "overflow": plan.overflow,
        "weights_only": weights_only,
        "device_map": plan.device_map(),
        "hf_device_map": plan.hf_device_map(),
        "components": components,
        "devices": devices,
        "host_offload_bytes": plan.host_offload_bytes,
        "disk_offload_bytes": plan.disk_offload_bytes,
        "scratch_bytes": plan.scratch_bytes,
        "notes": plan.notes,
    })
}

/// Aligned columns, the first row a header; columns from `right_from` up to the last right-aligned.
pub fn table(rows: &[Vec<String>], right_from: usize) -> String {
    let n = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..n).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i >= right_from && i < n - 1 {
                line.push_str(&format!("{cell:>w$}  ", w = widths[i]));
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn to_table(plan: &Plan, weights_only: bool) -> String {
    let mut rows = vec![["component", "dtype", "weights", "working", "peak", "device", "offload", "why"].map(String::from).to_vec()];
    for c in &plan.components {
        let device = match &c.split {
            Some(s) => {
                let mut ds: Vec<String> = vec![];
                for (_, d) in s {
                    if !ds.contains(&d.to_string()) {
                        ds.push(d.to_string());
                    }
                }
                ds.join("+")
            }
            None => c.device.to_string(),
        };
        rows.push(vec![
            c.name.clone(),
            c.dtype.as_str().to_string(),
            b(c.bytes),
            if weights_only { "-".into() } else { b(c.working_bytes) },
            b(c.peak_bytes),
            device,
            offload_cell(c),
            c.reason.clone(),
        ]);
    }
    let mut out = table(&rows, 2);
    out.push('\n');
    let mut drows = vec![["device", "budget", "planned", "free", "budget from"].map(String::from).to_vec()];
    for d in &plan.devices {
        drows.push(vec![d.device.to_string(), b(d.budget_bytes), b(d.planned_bytes), b(d.free_bytes), d.source.to_string()]);
    }
    out.push_str(&table(&drows, 1));
    if let Some(host) = plan.devices.iter().find(|d| d.device == crate::device::Device::Cpu) {
        let from = match host.source {
            BudgetSource::MaxMemory => "`placement.max_memory.cpu`".to_string(),
            BudgetSource::DevicesFlag => "`cpu=` of the device spec".to_string(),
            BudgetSource::Detected => "the detected RAM minus a reserve of 10%, at least 2 GiB (set `placement.max_memory.cpu` to choose)".to_string(),
        };
        out.push_str(&format!("host budget {} from {from}\n", b(host.budget_bytes)));
    }
    for c in &plan.components {
        if let (Some(split), Some(bytes)) = (&c.split, &c.split_bytes) {
            out.push_str(&format!("\n{} split ({}):\n", c.name, bytes.iter().map(|(d, x)| format!("{d} {}", b(*x))).collect::<Vec<_>>().join(", ")));
            for (m, d) in numbered_runs(split) {
                out.push_str(&format!("  {m} -> {d}\n"));
            }
        }
    }
    if plan.host_offload_bytes > 0 {
        out.push_str(&format!("\nhost memory for offloaded weights: {}\n", b(plan.host_offload_bytes)));
    }
    if plan.disk_offload_bytes > 0 {
        let scratch = if plan.scratch_bytes > 0 { format!(" ({} of them converted, in scratch files)", b(plan.scratch_bytes)) } else { String::new() };
        out.push_str(&format!("offloaded weights served from disk: {}{scratch}\n", b(plan.disk_offload_bytes)));
    }
    for n in &plan.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    if weights_only {
        out.push_str("weights only (diffusers' view): working memory not counted\n");
    }
    out
}

/// The offload column: the mode, `x N` for `group_blocks`, `, disk` for `offload_target = "disk"`.
fn offload_cell(c: &super::ComponentPlan) -> String {
    let mut s = match c.offload {
        Offload::None => "none",
        Offload::Model => "model",
        Offload::Sequential => "sequential",
        Offload::Group => "group",
    }
    .to_string();
    if c.offload == Offload::Group && c.group_blocks > 1 {
        s.push_str(&format!(" x{}", c.group_blocks));
    }
    if c.offload_target == crate::manifest::OffloadTarget::Disk {
        s.push_str(", disk");
    }
    s
}

/// The split map for people: consecutive numbered siblings on one device read as one line
/// (`single_transformer_blocks.6..=37`); `--json` keeps every entry.
fn numbered_runs<D: PartialEq>(split: &[(String, D)]) -> Vec<(String, &D)> {
    let numbered = |m: &str| m.rsplit_once('.').and_then(|(p, n)| n.parse::<u64>().ok().map(|n| (p.to_string(), n)));
    let mut out: Vec<(String, &D)> = vec![];
    let mut run: Option<(String, u64, u64, &D)> = None;
    fn flush<'a, D>(run: &mut Option<(String, u64, u64, &'a D)>, out: &mut Vec<(String, &'a D)>) {
        if let Some((p, a, b, d)) = run.take() {
            out.push((if a == b { format!("{p}.{a}") } else { format!("{p}.{a}..={b}") }, d));
        }
    }
    for (m, d) in split {
        match (numbered(m), &mut run) {
            (Some((p, n)), Some((rp, _, b, rd))) if *rp == p && *b + 1 == n && *rd == d => *b = n,
            (Some((p, n)), _) => {
                flush(&mut run, &mut out);
                run = Some((p, n, n, d));
            }
            (None, _) => {
                flush(&mut run, &mut out);
                out.push((m.clone(), d));
            }
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbered_runs_collapse_per_device() {
        let s = |m: &str, d: u8| (m.to_string(), d);
        let split = [s("x_embedder", 0), s("blocks.0", 0), s("blocks.1", 0), s("blocks.2", 1), s("blocks.3", 1), s("blocks.5", 1), s("norm_out", 1)];
        let got: Vec<String> = super::numbered_runs(&split).into_iter().map(|(m, d)| format!("{m} -> {d}")).collect();
        assert_eq!(got, ["x_embedder -> 0", "blocks.0..=1 -> 0", "blocks.2..=3 -> 1", "blocks.5 -> 1", "norm_out -> 1"]);
    }
}

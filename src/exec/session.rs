//! A pipeline loaded onto the devices of a plan, whatever its kind: planning and checks before
//! any weight is read, loading, the ledger and offload hooks around the pipeline's `__call__`,
//! re-plans without reading a file, and the outputs (PNGs with their provenance, dumps, the
//! report).

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::nn::VarStore;

use super::loading::{check_split, relocate, Loader, Split};
use super::pipelines::{self, Call, Dump, Pipeline};
use super::{allocator, check_devices, ledger, offload, output_paths, png, seed_of, tch_device, ExecError, HostMemory, InitImages, RunOptions, RunReport, Timings};
use crate::checkpoint::layout::PipelineFolder;
use crate::checkpoint::load::Mapped;
use crate::device::Device;
use crate::manifest::{LoadedManifest, Offload, OffloadTarget};
use crate::plan::build;
use crate::plan::Plan;
use crate::preflight::{Checked, RunSpec};

/// A pipeline loaded onto the devices of a plan: generate with it, or move its weights to a new
/// plan without reading any file again (diffusers' `reset_device_map` + a new placement).
pub struct Session<'m> {
    m: &'m LoadedManifest,
    /// The folder, its configs and the run, as preflight worked them out at load: each new job is
    /// checked against the folder and configs.
    checked: Checked,
    plan: Plan,
    simulate: bool,
    outputs: Vec<PathBuf>,
    seed: u64,
    model: Box<dyn Pipeline>,
    startup_s: f64,
    load_s: f64,
    host: HostMemory,
    started: Instant,
    warnings: Vec<String>,
    /// `offload_target = "disk"`'s scratch files, which the models' converted weights view: after
    /// `model`, so that they go (and their files with them) once nothing views them.
    scratch: Vec<super::scratch::Scratch>,
}

/// What one generation makes: its manifest (`[run]`), run, seed and outputs.
struct Job<'a> {
    m: &'a LoadedManifest,
    run: RunSpec,
    seed: u64,
    outputs: Vec<PathBuf>,
    /// Valid keys with no effect, the pipeline folder's notes.
    warnings: Vec<String>,
}

fn check_shape(shape: &crate::plan::memory::RunShape) -> Result<(), ExecError> {
    if shape.width % 8 != 0 || shape.height % 8 != 0 {
        return Err(ExecError::Unsupported(format!("width and height must be multiples of 8, got {}x{}", shape.width, shape.height)));
    }
    Ok(())
}

/// Every file a run of `m` reads: the pipeline's (indexes, shards, configs, tokenizers), the
/// manifest, its lock and `run.latents`.
fn input_files(m: &LoadedManifest, pipeline: &PipelineFolder) -> Vec<PathBuf> {
    let mut files = pipeline.files();
    files.push(m.path.clone());
    files.push(crate::lock::lock_path(&m.path));
    if let Some(l) = &m.manifest.run.latents {
        files.push(m.resolve_path("run.latents", l));
    }
    files
}

/// Every destination is checked before generating, not after: a folder, a read-only place, a
/// file where a folder should be, and a file the run reads (through a symlink, a hard link or
/// another spelling of its path: compared by device and inode), which is never replaced.
fn check_outputs(outputs: &[PathBuf], inputs: impl FnOnce() -> Vec<PathBuf>) -> Result<(), ExecError> {
    use std::os::unix::fs::MetadataExt;
    if outputs.is_empty() {
        return Ok(()); // `serve`'s in-memory PNGs: nothing to stat
    }
    let id = |p: &Path| std::fs::metadata(p).ok().map(|md| (md.dev(), md.ino()));
    let inputs = inputs();
    let reads: Vec<((u64, u64), &PathBuf)> = inputs.iter().filter_map(|p| id(p).map(|i| (i, p))).collect();
    for o in outputs {
        if let Some((_, input)) = id(o).and_then(|i| reads.iter().find(|(r, _)| *r == i)) {
            return Err(ExecError::Unsupported(format!("the output `{}` is `{}`, a file this run reads: runner never replaces its inputs (choose another output path)", o.display(), input.display())));
        }
    }
    for o in outputs {
        let dest = crate::fsutil::check_destination(o).map_err(|msg| ExecError::Io { what: "cannot write the image", path: o.clone(), source: std::io::Error::other(msg) })?;
        if o.extension().is_none_or(|e| !e.eq_ignore_ascii_case("png")) && !matches!(dest, crate::fsutil::Destination::InPlace(_)) {
            return Err(ExecError::Unsupported(format!("the output `{}` must be a `.png` file (or a device such as /dev/null)", o.display())));
        }
    }
    Ok(())
}

/// Plans, checks and loads (step 0 and 1 of a run).
pub fn load<'m>(m: &'m LoadedManifest, opts: &RunOptions) -> Result<Session<'m>, ExecError> {
    let started = Instant::now();
    let mut warnings = vec![];
    // 0. Plan (headers only), devices checked, outputs and dump folder writable, before loading.
    // Configs and the run are worked out once, here, and shared by the planner and the models.
    let checked = crate::preflight::check(m).map_err(ExecError::Preflight)?;
    warnings.extend(checked.folder.notes.iter().cloned());
    // Valid keys with no effect here (FLUX.1-schnell's ignored guidance_scale).
    warnings.extend(checked.run.warnings.iter().map(|d| d.message.clone()));
    let inventory = build::inventory(m, &opts.plan)?;
    let input = build::plan_input(m, &checked.folder, &checked.configs, &checked.run, inventory, &opts.plan);
    let plan = crate::plan::plan(&input)?;
    if !opts.simulate {
        check_devices(&plan)?;
    }
    for c in &plan.components {
        tracing::info!(component = %c.name, device = %c.device, dtype = c.dtype.as_str(), bytes = c.bytes, peak = c.peak_bytes, split = c.split.is_some(), "planned");
        if c.device == Device::Cpu && c.offload != Offload::None {
            warnings.push(format!("`{}` runs on the CPU, where its weights already live: `offload = \"{}\"` does nothing for it", c.name, format!("{:?}", c.offload).to_lowercase()));
        }
    }
    check_shape(&checked.run.shape)?;
    let outputs = if opts.in_memory { vec![] } else { output_paths(m, opts, checked.run.shape.batch as usize) };
    check_outputs(&outputs, || input_files(m, &checked.folder))?;
    if let Some(d) = &opts.dump {
        std::fs::create_dir_all(d).map_err(|source| ExecError::Io { what: "cannot create the dump folder", path: d.clone(), source })?;
        crate::fsutil::probe_writable(d).map_err(|source| ExecError::Io { what: "cannot write into the dump folder", path: d.clone(), source })?;
    }
    // `offload_target = "disk"`: the scratch folder takes files, or nothing is loaded.
    let scratch_dir = scratch_dir(m);
    if plan.components.iter().any(|c| c.offload_target == OffloadTarget::Disk) {
        super::scratch::check_dir(&scratch_dir)?;
    }
    let seed = seed_of(m);

    // 1. Load components on their planned devices (preflight checked that their configs fit
    //    together: a mismatch would otherwise surface as a libtorch shape error mid-run).
    let t_load = Instant::now();
    let startup_s = allocator::process_age_s().unwrap_or(0.0);
    let rss_before = allocator::host_rss().map_or(0, |(rss, _)| rss);
    let lx = Loader::new(m, &checked.folder, &plan, &checked.configs, opts.simulate, opts.progress, opts.images)?;
    // Declared before the models: on an error, the scratch files go after them.
    let mut scratch = vec![];
    crate::runtime::malloc_phase(true);
    let model = pipelines::load(m.manifest.pipeline.kind, &lx);
    crate::runtime::malloc_phase(false);
    let model = model?;
    let mut disk_backed = 0;
    for (name, vs, mapped) in model.components() {
        let Some(c) = plan.components.iter().find(|c| c.name == name && c.offload_target == OffloadTarget::Disk) else { continue };
        // Converted weights (not views of the checkpoint) go to a scratch file.
        let converted: Vec<tch::Tensor> = vs.variables().into_values().filter(|v| v.device() == tch::Device::Cpu && v.numel() > 0 && !mapped.contains(v.data_ptr() as *const u8)).collect();
        if !converted.is_empty() {
            scratch.push(super::scratch::Scratch::spill(&scratch_dir, &c.name, converted)?);
        }
        disk_backed += vs.variables().values().map(ledger::tensor_bytes).sum::<u64>();
    }
    let load_s = t_load.elapsed().as_secs_f64();
    let host = HostMemory {
        rss_before_load_bytes: rss_before,
        load_peak_rss_bytes: allocator::host_rss().map_or(0, |(_, peak)| peak),
        peak_rss_bytes: 0,
        loaded_bytes: lx.host_bytes().saturating_sub(disk_backed),
        disk_backed_bytes: disk_backed,
        scratch_bytes: scratch.iter().map(|s| s.bytes()).sum(),
    };
    drop(lx);
    let session = Session { m, checked, plan, simulate: opts.simulate, outputs, seed, model, startup_s, load_s, host, started, warnings, scratch };
    session.pin_offloaded(&[]);
    Ok(session)
}

impl Session<'_> {
    /// The plan the weights are placed by.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Generates the manifest's images (steps 2 to 6 of a run): the pipeline's `__call__` between
    /// offload hooks and the ledger, then the outputs.
    pub fn generate(&mut self, opts: &RunOptions) -> Result<RunReport, ExecError> {
        let job = Job { m: self.m, run: self.checked.run.clone(), seed: self.seed, outputs: self.outputs.clone(), warnings: self.warnings.clone() };
        self.generate_job(&job, opts)
    }

    /// Generates with another `[run]` on the loaded pipeline (`runner run --prompts`): `m` is the
    /// session's manifest with other `[run]` values (layered the way `--set` layers them, so
    /// that the image and its metadata are those of `runner run` with the same overrides), its
    /// images written to `opts.out` (numbered for batches, as `run` numbers them). Checked first,
    /// without touching the weights: everything but `[run]` equal to the loaded manifest's, what
    /// preflight checks of the run's keys (sizes against the configs), and a plan for the new
    /// shape that places every component as the loaded one does (a shape whose working memory
    /// exceeds the budgets is an error here, not an out-of-memory failure mid-run).
    pub fn generate_run(&mut self, m: &LoadedManifest, opts: &RunOptions) -> Result<RunReport, ExecError> {
        let (a, b) = (&m.manifest, &self.m.manifest);
        // The scheduler is built per call from the folder's config: it may change too.
        let same_pipeline = crate::manifest::Pipeline { scheduler: b.pipeline.scheduler, ..a.pipeline.clone() } == b.pipeline;
        if a.schema_version != b.schema_version || a.name != b.name || !same_pipeline || a.components != b.components || a.placement != b.placement {
            return Err(ExecError::Unsupported("only `[run]` keys and `pipeline.scheduler` can change on a loaded pipeline".into()));
        }
        // The folder and configs are the loaded ones: only what the job's keys change is checked.
        let Checked { folder, configs, run: loaded } = &self.checked;
        // A request's image is data: its size, not the manifest's file, shapes the run.
        let run = match &opts.init {
            Some(i) => RunSpec::with_images(m, configs, Some((i.image.width, i.image.height)), i.mask.as_ref().map(|(k, _)| (k.width, k.height))),
            None => RunSpec::new(m, configs),
        };
        let problems = crate::preflight::check_run(m, folder, configs, &run);
        if !problems.is_empty() {
            return Err(ExecError::Preflight(problems));
        }
        let mut warnings: Vec<String> = folder.notes.clone();
        warnings.extend(run.warnings.iter().map(|d| d.message.clone()));
        let shape = run.shape;
        check_shape(&shape)?;
        if shape != loaded.shape {
            let inventory = build::inventory(m, &opts.plan)?;
            let plan = crate::plan::plan(&build::plan_input(m, folder, configs, &run, inventory, &opts.plan)).map_err(|e| {
                ExecError::Unsupported(format!("at {}x{}, batch {}, the working memory does not fit the budgets the pipeline was loaded for: {}", shape.width, shape.height, shape.batch, e.message))
            })?;
            let placed = |p: &Plan| p.components.iter().map(|c| (c.name.clone(), c.device, c.split.clone(), c.offload)).collect::<Vec<_>>();
            if placed(&plan) != placed(&self.plan) {
                return Err(ExecError::Unsupported(format!(
                    "at {}x{}, batch {}, the plan places the components differently than the loaded pipeline ({:?} instead of {:?}): run this job on its own",
                    shape.width,
                    shape.height,
                    shape.batch,
                    plan.device_map(),
                    self.plan.device_map()
                )));
            }
        }
        let outputs = if opts.in_memory { vec![] } else { output_paths(m, opts, shape.batch as usize) };
        check_outputs(&outputs, || input_files(m, &self.checked.folder))?;
        let job = Job { m, run, seed: seed_of(m), outputs, warnings };
        self.generate_job(&job, opts)
    }

    fn generate_job(&mut self, job: &Job<'_>, opts: &RunOptions) -> Result<RunReport, ExecError> {
        let m = job.m;
        // Live adapters run at this job's scales: `run.adapter_scales`, else each one's `scale`.
        let overrides = m.manifest.run.adapter_scales.clone().unwrap_or_default();
        crate::models::lora::set_scales(m.manifest.adapters.iter().map(|(n, a)| (n.clone(), overrides.get(n).copied().unwrap_or(a.scale.unwrap_or(1.0)))).collect());
        let init = match &opts.init {
            Some(i) => Some(i.clone()),
            None => InitImages::of_manifest(m)?.map(std::sync::Arc::new),
        };
        let mut cx = Call {
            m,
            pipeline: &self.checked.folder,
            plan: &self.plan,
            run: &job.run,
            seed: job.seed,
            simulate: self.simulate,
            progress: opts.progress,
            watch: opts.watch.clone(),
            latents: opts.latents.clone(),
            res: self.residency()?,
            init: init.clone(),
            image_encode_s: Default::default(),
            dump: Dump::new(opts.dump.is_some()),
            warnings: job.warnings.clone(),
        };
        let g = self.model.call(&mut cx)?;
        // diffusers' `maybe_free_model_hooks`: offloaded components end in host memory (and a
        // budget a stream exceeded is an error before anything is written).
        cx.res.leave_all()?;
        cx.dump.push("latents.final", &g.latents);
        cx.dump.push("image", &g.images); // [N, H, W, 3]: the whole batch
        let Call { res, dump, mut warnings, image_encode_s, .. } = cx;

        // 6. Write, each image with what makes it again.
        let r = &m.manifest.run;
        let file = r.latents.as_ref().filter(|_| opts.latents.is_none()).map(|p| {
            let path = m.resolve_path("run.latents", p);
            let sha = crate::lock::sha256_file(&path).map(|(_, h)| h).unwrap_or_default();
            (path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), sha)
        });
        let latents = opts.latents.as_ref().map(|l| (super::latents::SOURCE.to_string(), l.sha256.clone())).or(file);
        let mut meta = png::ImageMeta {
            version: env!("CARGO_PKG_VERSION").to_string(),
            prompt: r.prompt.clone().unwrap_or_default(),
            negative_prompt: r.negative_prompt.clone().unwrap_or_default(),
            prompt_2: g.prompt_2.clone(),
            negative_prompt_2: g.negative_prompt_2.clone(),
            prompt_3: g.prompt_3.clone(),
            negative_prompt_3: g.negative_prompt_3.clone(),
            max_sequence_length: g.max_sequence_length,
            true_cfg_scale: g.true_cfg_scale,
            seed: if latents.is_some() { None } else { Some(job.seed) },
            batch_index: 0,
            batch_size: job.run.shape.batch as usize,
            latents,
            steps: g.steps,
            guidance_scale: g.guidance_scale,
            sampler: png::a1111_sampler(&g.scheduler, g.karras),
            scheduler: g.scheduler.clone(),
            clip_skip: r.clip_skip,
            width: job.run.shape.width,
            height: job.run.shape.height,
            model: self.checked.folder.root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            lock_sha256: opts.lock_sha256.clone(),
            dtype: dtype_summary(m),
            manifest_sha256: manifest_digest(m),
            adapters: m
                .manifest
                .adapters
                .iter()
                .map(|(name, a)| {
                    let path = m.resolve_path(&format!("adapters.{name}.source"), &a.source);
                    png::AdapterMeta {
                        name: name.clone(),
                        scale: a.scale.unwrap_or(1.0),
                        file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                        sha256: crate::lock::sha256_file(&path).map(|(_, h)| h).unwrap_or_default(),
                        a1111_hash: crate::checkpoint::lora::a1111_hash(&path).unwrap_or_default(),
                    }
                })
                .collect(),
            init: init.as_ref().zip(job.run.init).map(|(i, spec)| png::InitMeta {
                image_sha256: i.image_sha256.clone(),
                image_size: (i.image.width, i.image.height),
                mask_sha256: i.mask.as_ref().map(|(_, h)| h.clone()),
                strength: spec.strength,
            }),
        };
        let mut pngs = vec![];
        for i in 0..job.run.shape.batch as usize {
            let (w, h, rgb) = png::to_rgb8(&g.images.get(i as i64));
            meta.batch_index = i;
            let bytes = png::encode_png(w, h, &rgb, &meta.chunks()).map_err(|source| ExecError::Io { what: "cannot encode the image", path: PathBuf::from("<memory>"), source })?;
            match job.outputs.get(i) {
                Some(path) if !opts.in_memory => {
                    crate::fsutil::write_file(path, |w| w.write_all(&bytes)).map_err(|source| ExecError::Io { what: "cannot write the image", path: path.clone(), source })?
                }
                _ => pngs.push(bytes),
            }
        }
        if let Some(d) = &opts.dump {
            let p = d.join("dump.safetensors");
            png::write_dump(&p, &dump.into_tensors()).map_err(|source| ExecError::Io { what: "cannot write the dump", path: p, source })?;
        }
        let mut devices = res.ledger.borrow().report(&self.plan);
        if !self.simulate {
            for d in &self.plan.devices {
                if let (Device::Cuda(i), Some(use_)) = (d.device, devices.get_mut(&d.device.to_string())) {
                    use_.allocator = allocator::stats(i as usize).unwrap_or_else(|e| {
                        warnings.push(format!("cannot read the CUDA allocator's counters of {}: {e}", d.device));
                        None
                    });
                }
            }
        }
        drop(res);
        let first_step_s = g.step_times.first().copied().unwrap_or(0.0);
        let rest = if g.step_times.len() > 1 { &g.step_times[1..] } else { &g.step_times[..] };
        let seconds_per_step = rest.iter().sum::<f64>() / rest.len().max(1) as f64;
        Ok(RunReport {
            images: if opts.in_memory { vec![] } else { job.outputs.clone() },
            pngs,
            seed: job.seed,
            steps: g.steps,
            unet_calls: g.model_calls,
            scheduler: g.scheduler,
            width: job.run.shape.width,
            height: job.run.shape.height,
            device_map: self.plan.device_map(),
            simulated: opts.simulate,
            plan_notes: self.plan.notes.clone(),
            timings: Timings {
                startup_s: self.startup_s,
                load_s: self.load_s,
                encode_s: g.encode_s,
                image_encode_s: init.as_ref().map(|_| image_encode_s.get()),
                denoise_s: g.denoise_s,
                first_step_s,
                seconds_per_step,
                decode_s: g.decode_s,
                total_s: self.started.elapsed().as_secs_f64(),
            },
            devices,
            host: HostMemory { peak_rss_bytes: allocator::host_rss().map_or(0, |(_, peak)| peak), ..self.host },
            warnings,
        })
    }

    /// The ledger of the weights held now, each variable on its planned device; offloaded weights
    /// on the host, except those offloaded to disk that are views of a mapped file (the
    /// checkpoint, a scratch file): the page cache holds those, not a host copy.
    fn ledger(&self) -> Result<ledger::Ledger, ExecError> {
        let mut l = ledger::Ledger::new(&self.plan);
        for (name, vs, mapped) in self.model.components() {
            let cp = self.plan.components.iter().find(|c| c.name == name).ok_or_else(|| ExecError::Unsupported(format!("the plan has no `{name}`")))?;
            let bytes = match cp.offload {
                Offload::None => ledger::weigh(vs, cp.device, cp.split.as_deref()),
                _ if cp.offload_target == OffloadTarget::Disk => {
                    let on_disk = |p: *const u8| mapped.contains(p) || self.scratch.iter().any(|s| s.contains(p));
                    let host: u64 = vs.variables().values().filter(|v| !on_disk(v.data_ptr() as *const u8)).map(ledger::tensor_bytes).sum();
                    [(Device::Cpu, host)].into()
                }
                _ => ledger::weigh(vs, Device::Cpu, None),
            };
            l.add(name, &bytes)?;
        }
        Ok(l)
    }

    /// Weight bytes held on each planned device between runs (offloaded components at rest in
    /// host memory), as the ledger counts them: `runner serve`'s metrics.
    pub fn resident_bytes(&self) -> Result<std::collections::BTreeMap<String, u64>, ExecError> {
        let l = self.ledger()?;
        Ok(self.plan.devices.iter().map(|d| (d.device.to_string(), l.resident(d.device))).collect())
    }

    fn varstore(&self, name: &str) -> Option<&VarStore> {
        self.model.components().into_iter().find(|c| c.0 == name).map(|c| c.1)
    }

    /// The ledger and the offload hooks of the components that have them.
    fn residency(&self) -> Result<offload::Residency<'_>, ExecError> {
        let offloaded = || self.plan.components.iter().filter(|c| c.offload != Offload::None && c.device != Device::Cpu);
        let visitors = offloaded().filter(|c| c.offload == Offload::Model).filter_map(|c| self.varstore(&c.name).map(|vs| offload::Visitor::new(&c.name, vs, c.device, c.split.clone()))).collect();
        let runs_on = self.plan.components.iter().map(|c| (c.name.clone(), c.split.as_ref().map_or_else(|| vec![c.device], |s| s.iter().map(|x| x.1).collect()))).collect();
        let mut res = offload::Residency::new(self.ledger()?, visitors, runs_on, self.simulate);
        for c in offloaded().filter(|c| c.offload != Offload::Model) {
            if let Some(vs) = self.varstore(&c.name) {
                let run = if self.simulate { tch::Device::Cpu } else { tch_device(c.device) };
                res.add_stream(offload::Stream::grouped(&c.name, c.offload, vs, c.device, run, res.shared_ledger(), c.group_blocks));
            }
        }
        Ok(res)
    }

    /// Moves the loaded weights to `plan` (devices only: dtypes are the manifest's) without reading
    /// any file: every component's parameters go to their new devices, a split one's by module.
    pub fn apply_plan(&mut self, plan: Plan) -> Result<(), ExecError> {
        if !self.simulate {
            check_devices(&plan)?;
        }
        let map = |d: Device| if self.simulate { tch::Device::Cpu } else { tch_device(d) };
        for (name, vs, _) in self.model.components() {
            let cp = plan.components.iter().find(|c| c.name == name).ok_or_else(|| ExecError::Unsupported(format!("the new plan has no `{name}`")))?;
            check_split(name, &cp.class, cp.split.is_some())?;
            // `model`-style offload keeps the weights in host memory between runs.
            if cp.offload != Offload::None {
                relocate(vs, tch::Device::Cpu, None);
            } else {
                let split: Option<Split> = cp.split.as_ref().map(|s| s.iter().map(|(m, d)| (m.clone(), map(*d))).collect());
                relocate(vs, map(cp.device), split.as_deref());
            }
        }
        let already: Vec<String> = self.plan.components.iter().filter(|c| c.offload != Offload::None).map(|c| c.name.clone()).collect();
        self.plan = plan;
        self.pin_offloaded(&already);
        Ok(())
    }

    /// Offloaded weights go to page-locked host memory on CUDA machines, so their trips to
    /// the device are fast, asynchronous DMA copies; the mapped pages they were copied from go.
    fn pin_offloaded(&self, already: &[String]) {
        if self.simulate {
            return;
        }
        for (name, vs, mapped) in self.model.components() {
            // Offloaded to disk: the mapped files are the host copy, nothing is pinned.
            let Some(c) = self.plan.components.iter().find(|c| c.name == name && c.offload != Offload::None && c.offload_target == OffloadTarget::Host && !already.contains(&c.name)) else {
                continue;
            };
            let Device::Cuda(_) = c.device else {
                continue;
            };
            pin(vs, tch_device(c.device), mapped);
        }
    }
}

/// Pins `vs`'s host variables for `cuda`; a view of the checkpoint then drops its mapped pages,
/// so the pinned copy is the only one.
fn pin(vs: &VarStore, cuda: tch::Device, mapped: &Mapped) {
    tch::no_grad(|| {
        for (_, mut var) in vs.variables() {
            if var.device() == tch::Device::Cpu {
                // `_pin_memory`: `pin_memory(device)` warns that its argument is deprecated, and tch
                // always passes one.
                if let Ok(pinned) = var.f_internal_pin_memory(cuda) {
                    let view = var.shallow_clone();
                    var.set_data(&pinned);
                    mapped.release_copied(&view);
                }
            }
        }
    });
}

/// `placement.scratch_dir` (relative to the manifest), else the system's temporary folder.
fn scratch_dir(m: &LoadedManifest) -> PathBuf {
    m.manifest.placement.scratch_dir.as_ref().map_or_else(std::env::temp_dir, |d| m.resolve_path("placement.scratch_dir", d))
}

/// sha256 of the effective manifest (the file after environment variables and `--set`), as JSON.
fn manifest_digest(m: &LoadedManifest) -> String {
    use sha2::{Digest, Sha256};
    // `[serve]` (queue, limits, token) cannot change an image: a server's PNGs name the same
    // digest as `runner run`'s of the same manifest.
    let mut manifest = m.manifest.clone();
    manifest.serve = None;
    format!("{:x}", Sha256::digest(serde_json::to_vec(&manifest).unwrap_or_default()))
}

/// `fp16`, or `fp16 (vae fp32)` when components differ from the pipeline's dtype.
fn dtype_summary(m: &LoadedManifest) -> String {
    let base = m.manifest.pipeline.dtype;
    let own: Vec<String> = m.manifest.components.iter().filter_map(|(n, c)| c.dtype.filter(|d| *d != base).map(|d| format!("{n} {}", d.as_str()))).collect();
    if own.is_empty() {
        base.as_str().to_string()
    } else {
        format!("{} ({})", base.as_str(), own.join(", "))
    }
}

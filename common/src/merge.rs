//! Folding LoRA adapters into base weights: `W' = W + scale * B A`, computed in f32 and stored
//! in the base dtype (or a requested one), streamed tensor by tensor from the memory-mapped
//! base so peak memory stays about one tensor. Output is sharded past `max_shard_size`.

use crate::lora::Adapter;
use crate::weights::SafetensorsStore;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::cell::RefCell;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub base: PathBuf,
    pub adapter: PathBuf,
    pub output: PathBuf,
    /// Output dtype; `None` keeps each tensor's base dtype.
    pub dtype: Option<DType>,
    pub max_shard_size: u64,
    pub overwrite: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    pub merged_modules: usize,
    pub tensors: usize,
    pub shards: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// Parses sizes like `5GB`, `500MB`, `2GiB`, `1000000`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow!("invalid size '{s}' (e.g. 5GB, 500MB)"))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("invalid size unit '{other}' in '{s}'"),
    };
    Ok((n * mult) as u64)
}

/// The delta `scale · B A` of a module, in f32.
pub fn lora_delta(a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    Ok((b.matmul(&a)? * scale)?)
}

/// One output tensor, produced only when the safetensors writer asks for its bytes: the merged
/// `W + scale·B·A` in f32 converted to the output dtype, or the base tensor passed through
/// straight from the memory map (its pages are dropped when the next tensor is asked for).
/// Peak memory is about one tensor.
struct LazyTensor<'a> {
    store: &'a SafetensorsStore,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    /// (A, B, scale) when the tensor is a merged module's weight.
    delta: Option<(&'a Tensor, &'a Tensor, f64)>,
    /// The first error met while producing bytes (`View::data` cannot fail).
    error: &'a RefCell<Option<anyhow::Error>>,
    progress: &'a RefCell<&'a mut dyn FnMut()>,
    /// The pass-through tensor whose mapped pages the writer read last.
    written: &'a RefCell<Option<String>>,
}

/// Drops the mapped pages of the last pass-through tensor the writer read.
fn release_written(store: &SafetensorsStore, written: &RefCell<Option<String>>) {
    if let Some(name) = written.borrow_mut().take() {
        store.release(&name);
    }
}

impl<'a> LazyTensor<'a> {
    fn bytes(&self) -> Result<Cow<'a, [u8]>> {
        use safetensors::View;
        let store: &'a SafetensorsStore = self.store;
        let (raw, st, _) = store.raw(&self.name)?;
        let file = store.file_of(&self.name).expect("tensor is in the store");
        let src = crate::weights::candle_dtype(st, file, &self.name)?;
        Ok(match self.delta {
            None if src == self.dtype => {
                *self.written.borrow_mut() = Some(self.name.clone());
                raw
            }
            None => {
                let t = store.load(&self.name, self.dtype, &Device::Cpu)?;
                Cow::Owned(View::data(&t).into_owned())
            }
            Some((a, b, scale)) => {
                let w = store.load(&self.name, DType::F32, &Device::Cpu)?;
                let merged = (w + lora_delta(a, b, scale)?)?.to_dtype(self.dtype)?;
                Cow::Owned(View::data(&merged).into_owned())
            }
        })
    }
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.into()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        (self.progress.borrow_mut())();
        release_written(self.store, self.written);
        match self.bytes() {
            Ok(b) if b.len() == self.data_len() => b,
            other => {
                let e = other
                    .err()
                    .unwrap_or_else(|| anyhow!("tensor '{}': wrong byte count", self.name));
                self.error.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

pub fn merge(o: &MergeOptions, mut progress: impl FnMut(usize, usize)) -> Result<MergeReport> {
    let t0 = std::time::Instant::now();
    crate::atomic::refuse_inside(&o.output, &o.base, "base model directory")?;
    crate::atomic::refuse_inside(&o.output, &o.adapter, "adapter directory")?;
    crate::atomic::check_output_dir(&o.output, o.overwrite)?;
    let cfg = crate::config::ModelConfig::from_dir(&o.base)?;
    let adapter = Adapter::load(&o.adapter, DType::F32, &Device::Cpu)?;
    let store = SafetensorsStore::open_dir(&o.base)?;
    adapter.check_base(&o.base, cfg.num_hidden_layers, |m| {
        store.shape(&format!("{m}.weight"))
    })?;

    // plan: tensor -> (output dtype, shape, byte size), then shards by size
    let names: Vec<String> = store.names().cloned().collect();
    let mut plan = Vec::with_capacity(names.len());
    for n in &names {
        let (st, shape) = store.info(n)?;
        let src = crate::weights::candle_dtype(st, store.file_of(n).unwrap(), n)?;
        let dt = if src.is_float() {
            o.dtype.unwrap_or(src)
        } else {
            src
        };
        let bytes = shape.iter().product::<usize>() as u64 * dt.size_in_bytes() as u64;
        plan.push((n.clone(), dt, shape.to_vec(), bytes));
    }
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0u64;
    for (i, (_, _, _, bytes)) in plan.iter().enumerate() {
        if cur > 0 && cur + bytes > o.max_shard_size {
            shards.push(vec![]);
            cur = 0;
        }
        shards.last_mut().unwrap().push(i);
        cur += bytes;
    }
    let n_shards = shards.len();
    let out = crate::atomic::OutputDir::create(&o.output)?;
    let error = RefCell::new(None);
    let written = RefCell::new(None);
    let mut done = 0;
    let total_tensors = plan.len();
    let mut tick = || {
        done += 1;
        progress(done, total_tensors);
    };
    let tick: RefCell<&mut dyn FnMut()> = RefCell::new(&mut tick);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut merged = 0;
    for (si, idxs) in shards.iter().enumerate() {
        let fname = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n_shards)
        };
        let mut views = Vec::with_capacity(idxs.len());
        for &i in idxs {
            let (n, dt, shape, bytes) = &plan[i];
            let module = n.strip_suffix(".weight").unwrap_or(n);
            let delta = adapter
                .weights
                .get(module)
                .map(|(a, b)| (a, b, adapter.config.scale_for(module)));
            merged += usize::from(delta.is_some());
            weight_map.insert(n.clone(), serde_json::Value::String(fname.clone()));
            total += bytes;
            views.push((
                n.clone(),
                LazyTensor {
                    store: &store,
                    name: n.clone(),
                    dtype: *dt,
                    shape: shape.clone(),
                    delta,
                    error: &error,
                    progress: &tick,
                    written: &written,
                },
            ));
        }
        crate::weights::save_views(views, &out.path().join(&fname))?;
        release_written(&store, &written);
        if let Some(e) = error.borrow_mut().take() {
            return Err(e.context(format!("merging into {}", o.output.display())));
        }
    }
    if n_shards > 1 {
        let idx = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        crate::atomic::write_json(&out.path().join("model.safetensors.index.json"), &idx)?;
    }
    copy_side_files(&o.base, out.path(), o.dtype)?;
    if merged != adapter.weights.len() {
        bail!(
            "merged {merged} of {} adapter modules",
            adapter.weights.len()
        );
    }
    let record = serde_json::json!({
        "merged_by": format!("dialora merger {}", env!("CARGO_PKG_VERSION")),
        "base": o.base.display().to_string(),
        "adapter": o.adapter.display().to_string(),
        "lora_config": adapter.config,
        "merged_modules": merged,
        "formula": "W' = W + scale * B A (f32), scale = lora_alpha/r (alpha/sqrt(r) with use_rslora)",
        "dtype": o.dtype.map(|d| format!("{d:?}")).unwrap_or_else(|| "base".into()),
    });
    crate::atomic::write_json(&out.path().join("dialora_merge.json"), &record)?;
    out.commit()?;
    Ok(MergeReport {
        merged_modules: merged,
        tensors: plan.len(),
        shards: n_shards,
        bytes: total,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Copies the base's non-weight files (config, tokenizer, templates...): regular files only,
/// never through a symbolic link. config.json's torch_dtype follows a `--dtype` change.
fn copy_side_files(base: &Path, out: &Path, dtype: Option<DType>) -> Result<()> {
    for e in std::fs::read_dir(base).with_context(|| format!("{}: cannot read", base.display()))? {
        let e = e?;
        let meta = std::fs::symlink_metadata(e.path())?;
        if !meta.file_type().is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name.starts_with('.')
            || name == "dialora_merge.json"
        {
            continue;
        }
        if name == "config.json" {
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(e.path())?)?;
            if let Some(d) = dtype {
                v["torch_dtype"] = serde_json::json!(crate::config::torch_dtype_name(d));
            }
            crate::atomic::write_json(&out.join(&name), &v)?;
        } else {
            std::fs::copy(e.path(), out.join(&name))
                .with_context(|| format!("{}: cannot copy", e.path().display()))?;
        }
    }
    Ok(())
}

//! Folding LoRA adapters into base weights: `W' = W + scale * B A`, computed in f32 and stored
//! in the base dtype (or a requested one), streamed tensor by tensor from the memory-mapped
//! base so peak memory stays about one tensor. Output is sharded past `max_shard_size`.

use crate::lora::{Adapter, LoraConfig};
use crate::weights::{st_to_candle_dtype, SafetensorsStore};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use std::io::{BufWriter, Write};
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

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F64 => "F64",
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        _ => "F32",
    }
}

/// Little-endian bytes of a tensor in `dtype`.
fn tensor_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match dtype {
        DType::F32 => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::U32 => flat
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => bail!("cannot write dtype {other:?}"),
    })
}

/// Checks the adapter fits the base: every module's weight exists with matching shapes.
fn check_fit(
    adapter: &Adapter,
    store: &SafetensorsStore,
    base: &Path,
    cfg: &crate::config::ModelConfig,
) -> Result<()> {
    for (m, (a, b)) in &adapter.weights {
        let key = format!("{m}.weight");
        let Some(shape) = store.shape(&key) else {
            let layer = m.split('.').nth(2).and_then(|s| s.parse::<usize>().ok());
            if let Some(l) = layer.filter(|&l| l >= cfg.num_hidden_layers) {
                bail!(
                    "adapter targets layer {l} ('{m}') but the base in {} has {} layers: adapter for a different base?",
                    base.display(),
                    cfg.num_hidden_layers
                );
            }
            bail!("adapter module '{m}' has no weight '{key}' in the base {}: adapter for a different base?", base.display());
        };
        let (r, inp) = a.dims2()?;
        let (out, r2) = b.dims2()?;
        if shape != [out, inp] || r != r2 {
            bail!(
                "adapter module '{m}': lora_A {:?} and lora_B {:?} do not fit the base weight {shape:?} in {}: adapter for a different base?",
                a.dims(),
                b.dims(),
                base.display()
            );
        }
    }
    Ok(())
}

/// The delta `scale * B A` of a module, in f32.
pub fn lora_delta(cfg: &LoraConfig, module: &str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    Ok((b.matmul(&a)? * cfg.scale_for(module))?)
}

pub fn merge(o: &MergeOptions, mut progress: impl FnMut(usize, usize)) -> Result<MergeReport> {
    let t0 = std::time::Instant::now();
    crate::fsutil::refuse_inside(&o.output, &o.base, "base model directory")?;
    crate::fsutil::refuse_inside(&o.output, &o.adapter, "adapter directory")?;
    crate::fsutil::prepare_output_dir(&o.output, o.overwrite)?;
    let cfg = crate::config::ModelConfig::from_dir(&o.base)?;
    let adapter = Adapter::load(&o.adapter, DType::F32, &Device::Cpu)?;
    let store = SafetensorsStore::open_dir(&o.base)?;
    check_fit(&adapter, &store, &o.base, &cfg)?;

    // plan: tensor -> (output dtype, byte size), then shards by size
    let names: Vec<String> = store.names().cloned().collect();
    let mut plan = Vec::with_capacity(names.len());
    for n in &names {
        let (_, st, shape) = store.raw(n)?;
        let src = st_to_candle_dtype(st).ok_or_else(|| {
            anyhow!(
                "{}: tensor '{n}' has unsupported dtype {st:?}",
                store.file_of(n).unwrap().display()
            )
        })?;
        let is_float = matches!(src, DType::F32 | DType::BF16 | DType::F16 | DType::F64);
        let dt = if is_float {
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
    let tmp = crate::fsutil::temp_sibling(&o.output)?;
    let result = (|| -> Result<MergeReport> {
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        let mut done = 0;
        let mut merged = 0;
        for (si, idxs) in shards.iter().enumerate() {
            let fname = if n_shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", si + 1, n_shards)
            };
            // header first (serde_json), then the data in the same order
            let mut header = serde_json::Map::new();
            let mut off = 0u64;
            for &i in idxs {
                let (n, dt, shape, bytes) = &plan[i];
                header.insert(n.clone(), serde_json::json!({"dtype": dtype_name(*dt), "shape": shape, "data_offsets": [off, off + bytes]}));
                weight_map.insert(n.clone(), serde_json::Value::String(fname.clone()));
                off += bytes;
            }
            header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
            let mut h = serde_json::to_vec(&header)?;
            while h.len() % 8 != 0 {
                h.push(b' ');
            }
            let path = tmp.join(&fname);
            let f = std::fs::File::create(&path)
                .with_context(|| format!("{}: cannot create", path.display()))?;
            let mut w = BufWriter::with_capacity(8 << 20, f);
            w.write_all(&(h.len() as u64).to_le_bytes())?;
            w.write_all(&h)?;
            for &i in idxs {
                let (n, dt, _, bytes) = &plan[i];
                let module = n.strip_suffix(".weight").unwrap_or(n);
                let len = match adapter.weights.get(module) {
                    Some((a, b)) => {
                        let base = store.load(n, DType::F32, &Device::Cpu)?;
                        merged += 1;
                        let data = tensor_bytes(
                            &(base + lora_delta(&adapter.config, module, a, b)?)?,
                            *dt,
                        )?;
                        w.write_all(&data)?;
                        data.len()
                    }
                    None => {
                        let (raw, st, _) = store.raw(n)?;
                        if st_to_candle_dtype(st) == Some(*dt) {
                            // straight from the map, then drop its pages
                            w.write_all(raw)?;
                            store.release(n);
                            raw.len()
                        } else {
                            let data =
                                tensor_bytes(&store.load(n, DType::F32, &Device::Cpu)?, *dt)?;
                            w.write_all(&data)?;
                            data.len()
                        }
                    }
                };
                if len as u64 != *bytes {
                    bail!("internal error: tensor '{n}' wrote {len} bytes, planned {bytes}");
                }
                total += bytes;
                done += 1;
                progress(done, plan.len());
            }
            w.flush()?;
        }
        if n_shards > 1 {
            let idx =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            crate::weights::write_atomic(
                &tmp.join("model.safetensors.index.json"),
                (serde_json::to_string_pretty(&idx)? + "\n").as_bytes(),
            )?;
        }
        copy_side_files(&o.base, &tmp, o.dtype)?;
        let record = serde_json::json!({
            "merged_by": format!("dialora merger {}", env!("CARGO_PKG_VERSION")),
            "base": o.base.display().to_string(),
            "adapter": o.adapter.display().to_string(),
            "lora_config": adapter.config,
            "merged_modules": merged,
            "formula": "W' = W + scale * B A (f32), scale = lora_alpha/r (alpha/sqrt(r) with use_rslora)",
            "dtype": o.dtype.map(|d| format!("{d:?}")).unwrap_or_else(|| "base".into()),
        });
        crate::weights::write_atomic(
            &tmp.join("dialora_merge.json"),
            (serde_json::to_string_pretty(&record)? + "\n").as_bytes(),
        )?;
        if merged != adapter.weights.len() {
            bail!(
                "merged {merged} of {} adapter modules",
                adapter.weights.len()
            );
        }
        Ok(MergeReport {
            merged_modules: merged,
            tensors: plan.len(),
            shards: n_shards,
            bytes: total,
            seconds: 0.0,
        })
    })();
    match result {
        Ok(mut r) => {
            crate::fsutil::commit_dir(&tmp, &o.output)?;
            r.seconds = t0.elapsed().as_secs_f64();
            Ok(r)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
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
                let s = match d {
                    DType::BF16 => "bfloat16",
                    DType::F16 => "float16",
                    _ => "float32",
                };
                v["torch_dtype"] = serde_json::json!(s);
            }
            crate::weights::write_atomic(
                &out.join(&name),
                (serde_json::to_string_pretty(&v)? + "\n").as_bytes(),
            )?;
        } else {
            std::fs::copy(e.path(), out.join(&name))
                .with_context(|| format!("{}: cannot copy", e.path().display()))?;
        }
    }
    Ok(())
}

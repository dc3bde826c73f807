//! A model directory's weights: memory-mapped safetensors (one file, or shards with
//! `model.safetensors.index.json`), else PyTorch `pytorch_model.bin` checkpoints (one file, or
//! shards with `pytorch_model.bin.index.json`, as transformers 4.x's
//! `save_pretrained(safe_serialization=False)` writes them) through candle's pickle reader, one
//! tensor read at a time from its zip when asked for. A directory with both uses safetensors,
//! as transformers does.
//!
//! Every problem (missing file, truncated or corrupt header, missing tensor, wrong shape) is an
//! error that names the file and the tensor. Also the one safetensors writer every stage uses.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    data: ShardData,
    /// Every tensor's dtype and shape (and, for safetensors, its place in the data section).
    infos: HashMap<String, TensorInfo>,
}

enum ShardData {
    Safetensors {
        mmap: Mmap,
        data_start: usize,
    },
    /// A PyTorch checkpoint (zip of a pickled state dict and the tensors' storages).
    Pth(candle_core::pickle::PthTensors),
}

/// The tensors of a model (or adapter) directory, memory-mapped.
pub struct SafetensorsStore {
    shards: Vec<Shard>,
    index: BTreeMap<String, usize>,
}

/// candle's dtype for a safetensors dtype (candle's own mapping), or an error naming the tensor.
pub fn candle_dtype(d: StDtype, file: &Path, name: &str) -> Result<DType> {
    DType::try_from(d).map_err(|_| {
        anyhow!(
            "{}: tensor '{name}' has unsupported dtype {d:?}",
            file.display()
        )
    })
}

impl SafetensorsStore {
    /// Opens the weights of a model directory: `model.safetensors.index.json` when present,
    /// else every `*.safetensors` file in the directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let any_safetensors = dir.join("model.safetensors.index.json").exists()
            || std::fs::read_dir(dir)
                .with_context(|| format!("{}: cannot read model directory", dir.display()))?
                .filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
        if !any_safetensors {
            if let Some(files) = pth_files(dir)? {
                return Self::open_pth(dir, &files);
            }
        }
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let map = weight_map(&index)?;
            let mut names: Vec<String> = map
                .values()
                .map(|f| {
                    f.as_str().map(str::to_string).ok_or_else(|| {
                        anyhow!(
                            "{}: 'weight_map' values must be file names",
                            index.display()
                        )
                    })
                })
                .collect::<Result<_>>()?;
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("{}: cannot read model directory", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            bail!(
                "{}: no weights found (*.safetensors, or pytorch_model.bin)",
                dir.display()
            );
        }
        Self::open_files(&files)
    }

    /// PyTorch checkpoint files: each must hold a state dict, and with an index every tensor
    /// it maps to a file must be in that file.
    fn open_pth(dir: &Path, files: &PthFiles) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for (path, expected) in files {
            if !path.exists() {
                bail!("{}: missing PyTorch checkpoint shard", path.display());
            }
            let pth = candle_core::pickle::PthTensors::new(path, None)
                .map_err(|e| anyhow!("{}: not a PyTorch checkpoint: {e}", path.display()))?;
            if pth.tensor_infos().is_empty() {
                bail!(
                    "{}: holds no tensors: not a PyTorch state dict (a whole pickled model is not read; save its state_dict())",
                    path.display()
                );
            }
            let mut infos = HashMap::new();
            for (name, ti) in pth.tensor_infos() {
                let dtype = match ti.dtype {
                    DType::F32 => StDtype::F32,
                    DType::F16 => StDtype::F16,
                    DType::BF16 => StDtype::BF16,
                    other => bail!(
                        "{}: tensor '{name}' has dtype {other:?}; f32, f16 and bf16 are read",
                        path.display()
                    ),
                };
                let shape = ti.layout.dims().to_vec();
                let bytes = shape.iter().product::<usize>() * ti.dtype.size_in_bytes();
                index.insert(name.clone(), shards.len());
                infos.insert(
                    name.clone(),
                    TensorInfo {
                        dtype,
                        shape,
                        data_offsets: (0, bytes),
                    },
                );
            }
            if let Some(missing) = expected.iter().find(|k| !infos.contains_key(*k)) {
                bail!(
                    "{}: tensor '{missing}' is not in {}, where the index puts it",
                    dir.join("pytorch_model.bin.index.json").display(),
                    path.display()
                );
            }
            shards.push(Shard {
                path: path.clone(),
                data: ShardData::Pth(pth),
                infos,
            });
        }
        Ok(Self { shards, index })
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for path in files {
            let file = std::fs::File::open(path)
                .with_context(|| format!("{}: cannot open weights file", path.display()))?;
            // SAFETY: the file is opened read-only; we never hand out references that outlive
            // the map, and a concurrent writer would be a user error in any loader.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("{}: cannot memory-map", path.display()))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
            let data_start = 8 + n;
            let data_len = mmap.len() - data_start;
            let mut infos = HashMap::new();
            for (name, info) in meta.tensors() {
                if info.data_offsets.1 > data_len {
                    bail!(
                        "{}: truncated: tensor '{name}' ends at byte {} but the data section has {data_len}",
                        path.display(),
                        info.data_offsets.1
                    );
                }
                index.insert(name.clone(), shards.len());
                infos.insert(name, info.clone());
            }
            shards.push(Shard {
                path: path.clone(),
                data: ShardData::Safetensors { mmap, data_start },
                infos,
            });
        }
        Ok(Self { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.shards[i].path.as_path())
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let s = &self.shards[*self.index.get(name)?];
        Some(s.infos[name].shape.clone())
    }

    /// The dtype and shape of a tensor (nothing is read).
    pub fn info(&self, name: &str) -> Result<(StDtype, &[usize])> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| anyhow!("tensor '{name}' not found in {}", self.describe()))?;
        let info = &self.shards[i].infos[name];
        Ok((info.dtype, &info.shape))
    }

    /// Raw little-endian bytes and dtype of a tensor: a zero-copy view into the map for
    /// safetensors, the tensor read from its zip for a PyTorch checkpoint.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let (dtype, shape) = self.info(name)?;
        let s = &self.shards[self.index[name]];
        let bytes = match &s.data {
            ShardData::Safetensors { mmap, data_start } => {
                let (a, b) = s.infos[name].data_offsets;
                std::borrow::Cow::Borrowed(&mmap[data_start + a..data_start + b])
            }
            ShardData::Pth(pth) => {
                let t = pth
                    .get(name)
                    .map_err(|e| anyhow!("{}: tensor '{name}': {e}", s.path.display()))?
                    .ok_or_else(|| anyhow!("{}: tensor '{name}' missing", s.path.display()))?;
                // the tensor's bytes as safetensors would hold them (one copy, then the
                // tensor goes)
                std::borrow::Cow::Owned(safetensors::View::data(&t).into_owned())
            }
        };
        Ok((bytes, dtype, shape))
    }

    /// Loads a tensor (any shape) converted to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (bytes, st, shape) = self.raw(name)?;
        let file = self.file_of(name).unwrap();
        let src = candle_dtype(st, file, name)?;
        let t = Tensor::from_raw_buffer(&bytes, src, shape, &Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor '{name}': {e}", file.display()))?;
        let t = if src != dtype { t.to_dtype(dtype)? } else { t };
        self.release(name);
        Ok(t.to_device(device)?)
    }

    /// Drops the mapped pages of a tensor once it has been copied out, so a loaded model is not
    /// resident twice (the owned copy plus the page-cache pages counted in this process's RSS).
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(&i) = self.index.get(name) {
            let s = &self.shards[i];
            let ShardData::Safetensors { mmap, data_start } = &s.data else {
                return;
            };
            let (a, b) = s.infos[name].data_offsets;
            let page = 4096;
            let start = (data_start + a).div_ceil(page) * page;
            let end = ((data_start + b) / page) * page;
            if end > start {
                // SAFETY: read-only shared file mapping: MADV_DONTNEED only drops clean pages,
                // which are re-read from the file if touched again.
                unsafe {
                    let _ = mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    );
                }
            }
        }
    }

    /// Loads a tensor and checks its shape.
    pub fn load_shaped(
        &self,
        name: &str,
        shape: &Shape,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if let Some(have) = self.shape(name) {
            if have.as_slice() != shape.dims() {
                bail!(
                    "{}: tensor '{name}' has shape {have:?}, expected {:?}",
                    self.file_of(name).unwrap().display(),
                    shape.dims()
                );
            }
        }
        self.load(name, dtype, device)
    }

    fn describe(&self) -> String {
        match self.shards.as_slice() {
            [one] => one.path.display().to_string(),
            many => format!(
                "{} shards in {}",
                many.len(),
                many[0]
                    .path
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        }
    }
}

/// A tensor's bytes, dtype and shape (`SafetensorsStore::raw`).
pub type RawTensor<'a> = (std::borrow::Cow<'a, [u8]>, StDtype, &'a [usize]);

/// The `weight_map` of a sharded checkpoint's index file (tensor name -> file name).
fn weight_map(index: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("{}: cannot read", index.display()))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", index.display()))?;
    match v.get_mut("weight_map").map(serde_json::Value::take) {
        Some(serde_json::Value::Object(m)) => Ok(m),
        _ => bail!("{}: missing field 'weight_map'", index.display()),
    }
}

/// PyTorch checkpoint files, each with the tensors its index puts in it.
type PthFiles = Vec<(PathBuf, Vec<String>)>;

/// The PyTorch checkpoint files of a directory with their tensors by the index (empty lists
/// without one): `pytorch_model.bin.index.json`'s shards, else `pytorch_model.bin`; `None`
/// when there are none.
fn pth_files(dir: &Path) -> Result<Option<PthFiles>> {
    let index = dir.join("pytorch_model.bin.index.json");
    if index.exists() {
        let map = weight_map(&index)?;
        let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, f) in map {
            let f = f.as_str().ok_or_else(|| {
                anyhow!(
                    "{}: 'weight_map' values must be file names",
                    index.display()
                )
            })?;
            by_file.entry(f.to_string()).or_default().push(k.clone());
        }
        return Ok(Some(
            by_file.into_iter().map(|(f, k)| (dir.join(f), k)).collect(),
        ));
    }
    let single = dir.join("pytorch_model.bin");
    Ok(single.exists().then(|| vec![(single, Vec::new())]))
}

/// `SafetensorsStore` as a candle `VarBuilder` backend, so models load as `Model::load(vb, cfg)`.
impl candle_nn::var_builder::SimpleBackend for SafetensorsStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load_shaped(name, &s, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// safetensors metadata on every file dialora writes, as transformers and PEFT write it (some
/// readers refuse files without it).
pub fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Writes safetensors through the safetensors crate (its own dtype mapping and atomic
/// temp-file-and-rename write), with `{"format": "pt"}` metadata. `tensors` may be any
/// `safetensors::View`: candle tensors, or views that produce their bytes only when written
/// (the merger streams that way).
pub fn save_views<V: safetensors::View>(
    tensors: impl IntoIterator<Item = (String, V)>,
    path: &Path,
) -> Result<()> {
    safetensors::serialize_to_file(tensors, Some(pt_metadata()), path)
        .map_err(|e| anyhow!("{}: cannot write safetensors: {e}", path.display()))?;
    crate::atomic::set_mode(path, false);
    Ok(())
}

/// Writes candle tensors (any device, any dtype) as one safetensors file.
pub fn save(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    save_views(cpu, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_one(dir: &Path) -> PathBuf {
        let mut m = BTreeMap::new();
        m.insert(
            "w".to_string(),
            Tensor::arange(0f32, 12., &Device::Cpu)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        );
        let p = dir.join("model.safetensors");
        save(&m, &p).unwrap();
        p
    }

    #[test]
    fn roundtrip_and_shape_check() {
        let d = tempfile::tempdir().unwrap();
        let p = write_one(d.path());
        // every file carries transformers' {"format": "pt"} metadata
        let bytes = std::fs::read(&p).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let s = SafetensorsStore::open_dir(d.path()).unwrap();
        let t = s
            .load_shaped("w", &Shape::from((3, 4)), DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap()[2][3], 11.0);
        let e = s
            .load_shaped("w", &Shape::from((4, 3)), DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("'w'") && e.contains("[3, 4]"),
            "{e}"
        );
        let e = s
            .load("nope", DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'nope' not found"), "{e}");
    }

    #[test]
    fn truncated_and_corrupt_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write_one(d.path());
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 8]).unwrap();
        let e = SafetensorsStore::open_dir(d.path())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        std::fs::write(&p, b"garbage!garbage!").unwrap();
        let e = SafetensorsStore::open_dir(d.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
        let e = SafetensorsStore::open_dir(d.path())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no weights found"), "{e}");
    }

    #[test]
    fn sharded_index() {
        let d = tempfile::tempdir().unwrap();
        let mut a = BTreeMap::new();
        a.insert(
            "x".to_string(),
            Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
        );
        save(&a, &d.path().join("model-00001-of-00002.safetensors")).unwrap();
        let mut b = BTreeMap::new();
        b.insert(
            "y".to_string(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        save(&b, &d.path().join("model-00002-of-00002.safetensors")).unwrap();
        std::fs::write(
            d.path().join("model.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let s = SafetensorsStore::open_dir(d.path()).unwrap();
        assert_eq!(s.shape("y").unwrap(), vec![3]);
        assert!(s
            .file_of("x")
            .unwrap()
            .ends_with("model-00001-of-00002.safetensors"));
    }
}

//! Memory-mapped safetensors checkpoints (single file or sharded with an index), with
//! every error naming the file and tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;

use crate::nf4::{NestedAbsmax, Nf4Tensor, NF4_CODE};
use crate::{EngineError, Result};

type TensorInfo = (Dtype, Vec<usize>, (usize, usize));

struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    infos: HashMap<String, TensorInfo>,
}

/// The tensors of a checkpoint directory.
pub struct Weights {
    shards: Vec<Shard>,
    routing: HashMap<String, usize>,
}

/// A tensor's raw bytes.
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::file(path, format!("cannot open: {e}")))?;
    // SAFETY: the file is opened read-only; checkpoints are not modified while loaded.
    let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }
        .map_err(|e| EngineError::file(path, format!("cannot map: {e}")))?;
    let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| EngineError::file(path, format!("not a valid safetensors file: {e}")))?;
    let data_start = 8 + n;
    let mut infos = HashMap::new();
    for (name, info) in meta.tensors() {
        let (a, b) = info.data_offsets;
        if data_start + b > mmap.len() || a > b {
            return Err(EngineError::file(path, format!("tensor {name}: data offsets past the end of the file")));
        }
        infos.insert(name.clone(), (info.dtype, info.shape.clone(), info.data_offsets));
    }
    Ok(Shard { path: path.to_path_buf(), mmap, data_start, infos })
}

pub fn dtype_size(d: Dtype) -> Option<usize> {
    Some(match d {
        Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
        Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
        Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        Dtype::U8 | Dtype::I8 | Dtype::BOOL => 1,
        _ => return None,
    })
}

impl Weights {
    /// Open `dir/model.safetensors`, or the shards listed by
    /// `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| EngineError::file(&index, format!("cannot read: {e}")))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| EngineError::file(&index, format!("invalid json: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::file(&index, "missing weight_map object"))?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains('\\') || n.starts_with('.') {
                    return Err(EngineError::file(&index, format!("shard name {n:?} is not a plain file name")));
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(EngineError::file(
                &single,
                "model file not found (neither model.safetensors nor model.safetensors.index.json exists)",
            ));
        };
        let mut shards = Vec::new();
        let mut routing = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let s = open_shard(f)?;
            for k in s.infos.keys() {
                routing.insert(k.clone(), i);
            }
            shards.push(s);
        }
        Ok(Self { shards, routing })
    }

    pub fn has(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.routing.keys().cloned().collect();
        v.sort();
        v
    }

    fn first_file(&self) -> PathBuf {
        self.shards.first().map(|s| s.path.clone()).unwrap_or_default()
    }

    /// The file a tensor lives in (or the first file when it is missing).
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.routing.get(name).map(|&i| self.shards[i].path.clone()).unwrap_or_else(|| self.first_file())
    }

    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let &i = self
            .routing
            .get(name)
            .ok_or_else(|| EngineError::file(self.first_file(), format!("missing tensor {name}")))?;
        let s = &self.shards[i];
        let (dtype, shape, (a, b)) = &s.infos[name];
        let numel: usize = shape.iter().product();
        let size = dtype_size(*dtype)
            .ok_or_else(|| EngineError::file(&s.path, format!("tensor {name}: unsupported dtype {dtype:?}")))?;
        if numel * size != b - a {
            return Err(EngineError::file(&s.path, format!("tensor {name}: {} bytes for shape {shape:?}", b - a)));
        }
        Ok(RawTensor { dtype: *dtype, shape: shape.clone(), data: &s.mmap[s.data_start + a..s.data_start + b] })
    }

    /// Load a float tensor on `device` in `dtype`.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let r = self.raw(name)?;
        let src = match r.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            d => return Err(EngineError::file(self.file_of(name), format!("tensor {name}: expected a float tensor, found {d:?}"))),
        };
        let t = Tensor::from_raw_buffer(r.data, src, &r.shape, &Device::Cpu)?;
        // `t` owns a copy: the mapped pages can go (see `release`).
        self.release(name);
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// Drop this process's mapping of a tensor's pages once its bytes have been copied
    /// (`madvise(MADV_DONTNEED)`; best effort). Without it every page of every shard
    /// that was read stays in the process's resident set until the model is dropped:
    /// loading a 14 GB checkpoint would show 14 GB more RSS than the model it built
    /// (reclaimable page cache, but counted against the process and its cgroup). The
    /// pages stay in the page cache; a later read maps them again.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(&i) = self.routing.get(name) {
            let s = &self.shards[i];
            let (_, _, (a, b)) = &s.infos[name];
            if b > a {
                // SAFETY: the map is a read-only mapping of a file; MADV_DONTNEED only
                // unmaps its pages from this process, and any later access faults the
                // same file contents back in, so no reference sees different bytes.
                let _ = unsafe { s.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s.data_start + a, b - a) };
            }
        }
    }

    /// Load a float tensor and check its shape.
    pub fn tensor_shaped(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.tensor(name, dtype, device)?;
        if t.dims() != shape {
            return Err(EngineError::file(
                self.file_of(name),
                format!("tensor {name} has shape {:?}, config implies {shape:?}", t.dims()),
            ));
        }
        Ok(t)
    }

    /// A float tensor as f32 values.
    pub fn f32_values(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.tensor(name, DType::F32, &Device::Cpu)?;
        Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))
    }

    /// Whether `<prefix>.weight` is stored in bitsandbytes' 4-bit layout.
    pub fn is_bnb_4bit(&self, prefix: &str) -> bool {
        self.has(&format!("{prefix}.weight.quant_state.bitsandbytes__nf4"))
            || self.has(&format!("{prefix}.weight.quant_state.bitsandbytes__fp4"))
    }

    /// Read a bitsandbytes 4-bit weight `<prefix>.weight` (+ absmax, quant_map, nested
    /// statistics and quant_state).
    pub fn bnb_nf4(&self, prefix: &str) -> Result<Nf4Tensor> {
        let wname = format!("{prefix}.weight");
        let file = self.file_of(&wname);
        if self.has(&format!("{wname}.quant_state.bitsandbytes__fp4")) {
            return Err(EngineError::file(file, format!("{wname}: fp4 quantization is not supported (nf4 only)")));
        }
        let qs_name = format!("{wname}.quant_state.bitsandbytes__nf4");
        let qs_raw = self.raw(&qs_name)?;
        let qs: serde_json::Value = serde_json::from_slice(qs_raw.data)
            .map_err(|e| EngineError::file(&file, format!("{qs_name}: invalid quant state json: {e}")))?;
        let bad = |m: String| EngineError::file(&file, format!("{qs_name}: {m}"));
        let blocksize = qs.get("blocksize").and_then(|b| b.as_u64()).unwrap_or(64);
        if blocksize != crate::nf4::NF4_BLOCKSIZE as u64 {
            return Err(bad(format!("blocksize {blocksize} is not supported (64 only)")));
        }
        let shape: Vec<usize> = qs
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| bad("missing shape".into()))?;
        if shape.len() != 2 {
            return Err(bad(format!("shape {shape:?} is not 2-d")));
        }
        let qmap_name = format!("{wname}.quant_map");
        if self.has(&qmap_name) {
            let (_, qmap) = self.f32_values(&qmap_name)?;
            if qmap != NF4_CODE {
                return Err(EngineError::file(&file, format!("{qmap_name}: not the nf4 code table")));
            }
        }
        let packed = self.raw(&wname)?;
        if packed.dtype != Dtype::U8 {
            return Err(EngineError::file(&file, format!("{wname}: packed 4-bit weight must be u8, found {:?}", packed.dtype)));
        }
        let packed = packed.data.to_vec();
        self.release(&wname);
        let absmax_name = format!("{wname}.absmax");
        let absmax_raw = self.raw(&absmax_name)?;
        let (absmax, nested) = if absmax_raw.dtype == Dtype::U8 {
            let nested_offset = qs
                .get("nested_offset")
                .and_then(|o| o.as_f64())
                .ok_or_else(|| bad("nested absmax without nested_offset".into()))? as f32;
            let nb = qs.get("nested_blocksize").and_then(|b| b.as_u64()).unwrap_or(256);
            if nb != crate::nf4::NESTED_BLOCKSIZE as u64 {
                return Err(bad(format!("nested_blocksize {nb} is not supported (256 only)")));
            }
            let (_, nested_absmax) = self.f32_values(&format!("{wname}.nested_absmax"))?;
            let (_, nested_code) = self.f32_values(&format!("{wname}.nested_quant_map"))?;
            let absmax_q = absmax_raw.data.to_vec();
            if nested_code.len() != 256 || nested_absmax.len() != absmax_q.len().div_ceil(256) {
                return Err(EngineError::file(&file, format!("{wname}: nested statistics have the wrong sizes")));
            }
            let n = NestedAbsmax { absmax_q, nested_absmax, nested_code, offset: nested_offset };
            (n.dequantize(), Some(n))
        } else {
            (self.f32_values(&absmax_name)?.1, None)
        };
        Nf4Tensor::from_parts(shape, packed, absmax, nested).map_err(|e| EngineError::file(&file, format!("{wname}: {e}")))
    }

    /// Tensor names grouped: for a bnb checkpoint, names that are the companions of a
    /// 4-bit weight (absmax, quant_map, ...).
    pub fn companion_suffixes() -> &'static [&'static str] {
        &[".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"]
    }

    /// All tensors as `(dtype, shape, bytes)` (for copying checkpoints).
    pub fn all_raw(&self) -> Result<BTreeMap<String, RawTensor<'_>>> {
        self.names().into_iter().map(|n| Ok((n.clone(), self.raw(&n)?))).collect()
    }
}

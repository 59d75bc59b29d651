//! GGUF files (llama.cpp's container, also used for quantized diffusion models by ComfyUI-GGUF
//! and stable-diffusion.cpp): the header and tensor index read once, the tensor data mapped
//! into memory and handed out as it is stored.
//!
//! A tensor comes back as a [`QTensor`] in the ggml type it is stored in (F32, F16 and BF16
//! included), its shape in row-major order (GGUF lists dimensions innermost first; candle's
//! reader reverses them), copied once from the mapping to its device; [`GgufFile::stored`]
//! lends the stored bytes themselves. [`write`] writes such a file.

use std::{
    fs::File,
    io::{BufReader, BufWriter},
    path::{Path, PathBuf},
};

use candle_core::{
    Device, Result, Shape,
    quantized::{
        GgmlDType, QTensor,
        gguf_file::{self, Content, TensorInfo, Value},
    },
};
use memmap2::Mmap;

/// The first four bytes of every GGUF file.
const MAGIC: &[u8; 4] = b"GGUF";

/// Whether `path` is a file that starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == MAGIC)
}

/// An open GGUF file: its metadata and tensor index, and the file mapped into memory.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    map: Mmap,
}

/// One tensor as the file stores it, borrowed from the mapping.
#[derive(Debug, Clone, Copy)]
pub struct StoredTensor<'a> {
    pub dtype: GgmlDType,
    /// Row-major.
    pub shape: &'a Shape,
    pub bytes: &'a [u8],
}

/// The alignment every ggml type's data needs in memory (its f32 scales); GGUF aligns tensor
/// data to 32 bytes unless `general.alignment` says otherwise.
const DATA_ALIGNMENT: u64 = 4;

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Reads the header and tensor index of `path` and maps the file. The file must not
    /// change while it is open (as for memory-mapped safetensors).
    #[allow(unsafe_code)]
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)?;
        let content = Content::read(&mut BufReader::new(&file))
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        // SAFETY: as in `mmap_safetensors`: weights are treated as immutable while mapped.
        let map = unsafe { Mmap::map(&file)? };
        Ok(Self {
            path: path.to_owned(),
            content,
            map,
        })
    }

    /// Metadata value `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// Metadata value `key`, or an error naming it.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.metadata(key)
            .ok_or_else(|| candle_core::Error::msg(format!("GGUF metadata {key} is missing")))
    }

    /// Every tensor's name, stored type and shape.
    pub fn tensor_infos(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.content
            .tensor_infos
            .iter()
            .map(|(name, info)| (name.as_str(), info))
    }

    /// The index entry of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.content.tensor_infos.get(name)
    }

    /// Tensor `name` as stored, on `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let t = self.stored(name)?;
        QTensor::new(
            klein_kernels::upload::blocks(t.bytes, t.dtype, device)?,
            t.shape.clone(),
        )
    }

    /// Tensor `name`'s stored bytes.
    pub fn stored(&self, name: &str) -> Result<StoredTensor<'_>> {
        let fail = |why: String| candle_core::Error::msg(format!("GGUF tensor {name}: {why}"));
        let info = self
            .tensor_info(name)
            .ok_or_else(|| fail("not in the file".into()))?;
        let (elems, block) = (info.shape.elem_count(), info.ggml_dtype.block_size());
        if !elems.is_multiple_of(block) {
            return Err(fail(format!(
                "{elems} elements are not whole blocks of {block}"
            )));
        }
        let len = (elems / block * info.ggml_dtype.type_size()) as u64;
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        if !start.is_multiple_of(DATA_ALIGNMENT) {
            return Err(fail(format!(
                "data at byte {start}, not aligned to {DATA_ALIGNMENT}"
            )));
        }
        let bytes = usize::try_from(start)
            .ok()
            .zip(usize::try_from(start.saturating_add(len)).ok())
            .and_then(|(a, b)| self.map.get(a..b))
            .ok_or_else(|| {
                fail(format!(
                    "{len} bytes at byte {start}, past the end of the file ({} bytes)",
                    self.map.len()
                ))
            })?;
        Ok(StoredTensor {
            dtype: info.ggml_dtype,
            shape: &info.shape,
            bytes,
        })
    }
}

/// Writes `tensors` (in the order given) with `metadata` as the GGUF file `out`, synced to
/// disk before it returns.
pub fn write(out: &Path, metadata: &[(&str, &Value)], tensors: &[(&str, &QTensor)]) -> Result<()> {
    let mut file = BufWriter::new(File::create(out)?);
    gguf_file::write(&mut file, metadata, tensors)?;
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;

    /// A file's tensors come back as written, on the host and as borrowed bytes; a file cut
    /// short inside a tensor's data is an error naming the tensor, not a panic.
    #[test]
    fn tensors_come_back_as_written_and_a_short_file_is_an_error() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("klein-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("t.gguf");
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 64), &dev)?;
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let row = Tensor::new(w.get(0)?.to_vec1::<f32>()?, &dev)?;
        let f32 = QTensor::quantize(&row, GgmlDType::F32)?;
        let arch = Value::String("test".into());
        write(
            &path,
            &[("general.architecture", &arch)],
            &[("a", &q8), ("b", &f32)],
        )?;

        let file = GgufFile::open(&path)?;
        let a = file.stored("a")?;
        assert_eq!((a.dtype, a.shape.dims()), (GgmlDType::Q8_0, &[4, 64][..]));
        assert_eq!(a.bytes, &*q8.data()?);
        let b = file.tensor("b", &dev)?;
        assert_eq!(b.dequantize(&dev)?.to_vec1::<f32>()?, row.to_vec1::<f32>()?);
        assert!(
            file.stored("c")
                .unwrap_err()
                .to_string()
                .contains("c: not in the file")
        );

        let full = std::fs::read(&path)?;
        std::fs::write(&path, &full[..full.len() - 8])?;
        let short = GgufFile::open(&path)?;
        let err = short.stored("b").unwrap_err().to_string();
        assert!(
            err.contains("GGUF tensor b") && err.contains("past the end"),
            "{err}"
        );
        assert!(short.tensor("b", &dev).is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

//! GGUF files (llama.cpp's container, also used for quantized diffusion models by ComfyUI-GGUF
//! and stable-diffusion.cpp): the header and tensor index read once, tensors read on demand.
//!
//! A tensor comes back as a [`QTensor`] in the ggml type it is stored in (F32, F16 and BF16
//! included), its shape in row-major order (GGUF lists dimensions innermost first; candle's
//! reader reverses them). [`write`] writes such a file.

use std::{
    fs::File,
    io::{BufReader, BufWriter},
    path::{Path, PathBuf},
    sync::Mutex,
};

use candle_core::{
    Device, Result,
    quantized::{
        QTensor,
        gguf_file::{self, Content, TensorInfo, Value},
    },
};

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

/// An open GGUF file: its metadata and tensor index, and the file to read tensors from.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Reads the header and tensor index of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut reader = BufReader::new(File::open(path)?);
        let content = Content::read(&mut reader)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_owned(),
            content,
            reader: Mutex::new(reader),
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
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        self.content
            .tensor(&mut *reader, name, device)
            .map_err(|e| candle_core::Error::msg(format!("GGUF tensor {name}: {e}")))
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

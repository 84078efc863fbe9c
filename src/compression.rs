//! NAR compression, and the single pass that turns a store path into upload chunks:
//! filesystem → NAR → SHA-256 (NarHash) → compressor → SHA-256 (FileHash) → chunks.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::str::FromStr;

use bytes::{Bytes, BytesMut};
use sha2::Digest;
use tokio::sync::mpsc;

use crate::format::{Sha256, nar};

/// How NAR files are compressed in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    /// zstd at the given level (1–19); `threads` > 1 splits large NARs across cores.
    Zstd {
        level: i32,
        threads: u32,
    },
    /// xz at the given preset (0–9).
    Xz {
        level: u32,
    },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd {
            level: 3,
            threads: 0,
        }
    }
}

impl Compression {
    /// The narinfo `Compression:` value.
    pub fn name(&self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd { .. } => "zstd",
            Compression::Xz { .. } => "xz",
        }
    }

    /// The NAR file extension Nix uses for this compression.
    pub fn extension(&self) -> &'static str {
        match self {
            Compression::None => ".nar",
            Compression::Zstd { .. } => ".nar.zst",
            Compression::Xz { .. } => ".nar.xz",
        }
    }

    /// Sets the level, checking it is in range for the algorithm.
    pub fn with_level(self, level: i32) -> Result<Self, String> {
        match self {
            Compression::None => Err("--compression-level does not apply to 'none'".into()),
            Compression::Zstd { threads, .. } if (1..=19).contains(&level) => {
                Ok(Compression::Zstd { level, threads })
            }
            Compression::Xz { .. } if (0..=9).contains(&level) => Ok(Compression::Xz {
                level: level as u32,
            }),
            _ => Err(format!(
                "compression level {level} is out of range for {} (zstd: 1-19, xz: 0-9)",
                self.name()
            )),
        }
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zstd" => Ok(Compression::default()),
            "xz" => Ok(Compression::Xz { level: 6 }),
            "none" => Ok(Compression::None),
            other => Err(format!(
                "unknown compression {other:?} (use zstd, xz or none)"
            )),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one pass over a store path produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Produced {
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub file_hash: Sha256,
    pub file_size: u64,
    /// The NAR listing (`<hash>.ls`), when asked for.
    pub listing: Option<String>,
}

/// Counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    hasher: sha2::Sha256,
    count: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Cuts the compressed stream into chunks for a bounded channel; blocks when it is full,
/// which is the backpressure that keeps memory independent of the NAR's size.
struct ChunkSink {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
    chunk: usize,
}

impl ChunkSink {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(self.chunk);
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.chunk - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.chunk {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Encoder {
    None(Hashing<ChunkSink>),
    Zstd(zstd::stream::write::Encoder<'static, Hashing<ChunkSink>>),
    Xz(liblzma::write::XzEncoder<Hashing<ChunkSink>>),
}

impl Write for Encoder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Zstd(w) => w.write(buf),
            Encoder::Xz(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Zstd(w) => w.flush(),
            Encoder::Xz(w) => w.flush(),
        }
    }
}

impl Encoder {
    fn new(c: Compression, out: Hashing<ChunkSink>, nar_size_hint: u64) -> io::Result<Self> {
        Ok(match c {
            Compression::None => Encoder::None(out),
            Compression::Zstd { level, threads } => {
                let mut e = zstd::stream::write::Encoder::new(out, level)?;
                e.include_checksum(true)?;
                // Tables sized for the NAR, not for an unknown (unbounded) input: most NARs
                // are a few KiB, and clearing full-size tables for each of them was the
                // largest single cost of pushing 2,000 small paths. A hint, not a pledge, so
                // a path that changed while read still ends in the NarHash check.
                if nar_size_hint > 0 {
                    let hint = u32::try_from(nar_size_hint).unwrap_or(u32::MAX);
                    e.set_parameter(zstd::stream::raw::CParameter::SrcSizeHint(hint))?;
                }
                // Worker threads only pay off when there is more than one job's worth of input.
                if threads > 1 && nar_size_hint > 8 << 20 {
                    e.multithread(threads)?;
                    // Each large NAR in flight holds several of zstd's jobs in memory. With
                    // the default job (8 MiB at level 3) a push of one 300 MiB NAR peaked at
                    // 117 MiB RSS; with 2 MiB jobs at 76 MiB, for 1% more output at the
                    // same speed (2 cores).
                    e.set_parameter(zstd::stream::raw::CParameter::JobSize(2 << 20))?;
                }
                Encoder::Zstd(e)
            }
            Compression::Xz { level } => Encoder::Xz(liblzma::write::XzEncoder::new(out, level)),
        })
    }

    fn finish(self) -> io::Result<Hashing<ChunkSink>> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
        }
    }
}

/// Serialises `path`, compresses it and sends it in `chunk`-sized pieces to `tx`.
/// Runs on a blocking thread; returns once everything was handed to the channel.
pub fn produce(
    path: &Path,
    compression: Compression,
    nar_size_hint: u64,
    chunk: usize,
    tx: mpsc::Sender<Bytes>,
) -> io::Result<Produced> {
    produce_listed(path, compression, nar_size_hint, chunk, tx, false)
}

/// As [`produce`], and with `listing` also the NAR listing, made in the same pass over
/// the files (no second read).
pub fn produce_listed(
    path: &Path,
    compression: Compression,
    nar_size_hint: u64,
    chunk: usize,
    tx: mpsc::Sender<Bytes>,
    listing: bool,
) -> io::Result<Produced> {
    let sink = ChunkSink {
        tx,
        buf: BytesMut::with_capacity(chunk),
        chunk,
    };
    let file = Hashing {
        inner: sink,
        hasher: sha2::Sha256::new(),
        count: 0,
    };
    let mut nar_out = Hashing {
        inner: Encoder::new(compression, file, nar_size_hint)?,
        hasher: sha2::Sha256::new(),
        count: 0,
    };
    // NAR writing issues many small writes; a buffer keeps them off the compressor's path.
    let listing = {
        let mut buffered = io::BufWriter::with_capacity(128 * 1024, &mut nar_out);
        let listing = if listing {
            Some(nar::dump_path_listed(path, &mut buffered)?.to_string())
        } else {
            nar::dump_path(path, &mut buffered)?;
            None
        };
        buffered.flush()?;
        listing
    };
    let Hashing {
        inner: encoder,
        hasher: nar_hasher,
        count: nar_size,
    } = nar_out;
    let mut file = encoder.finish()?;
    file.inner.send()?;
    Ok(Produced {
        nar_hash: Sha256::from_bytes(nar_hasher.finalize().into()),
        nar_size,
        file_hash: Sha256::from_bytes(file.hasher.finalize().into()),
        file_size: file.count,
        listing,
    })
}

/// Reads the NAR back out of a file compressed as a narinfo's `Compression:` value says
/// (`none`, `zstd`, `xz`; empty means none, as Nix reads it): the decode side of
/// [`Compression`], for verify and for the gateway.
pub fn decoder<'a, R: io::Read + 'a>(
    compression: &str,
    input: R,
) -> Result<Box<dyn io::Read + 'a>, String> {
    Ok(match compression {
        "none" | "" => Box::new(input),
        "zstd" => Box::new(zstd::Decoder::new(input).map_err(|e| e.to_string())?),
        "xz" => Box::new(liblzma::read::XzDecoder::new(input)),
        other => return Err(format!("compression {other:?} is not supported")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A small tree: files (one executable), a directory, a symlink, and one file of
    /// `big` bytes of varied content.
    fn tree(big: usize) -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("p");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("a.txt"), b"hello\n").unwrap();
        std::fs::write(root.join("bin/run"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(root.join("bin/run"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
        let blob: Vec<u8> = (0..big).map(|i| ((i * 7919) ^ (i >> 9)) as u8).collect();
        std::fs::write(root.join("blob"), blob).unwrap();
        t
    }

    /// Through [`decoder`], by the narinfo name: encode and decode are each other's inverse.
    fn decompress(c: Compression, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        decoder(c.name(), bytes)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// Runs `produce` on its own thread, as the push does, reading the chunks here.
    fn run(path: &Path, c: Compression, chunk: usize, cap: usize) -> (Produced, Vec<Bytes>) {
        let (tx, mut rx) = mpsc::channel(cap);
        let p = path.to_owned();
        let producer = std::thread::spawn(move || produce(&p, c, 0, chunk, tx));
        let mut chunks = Vec::new();
        while let Some(b) = rx.blocking_recv() {
            chunks.push(b);
        }
        (producer.join().unwrap().unwrap(), chunks)
    }

    #[test]
    fn one_pass_gives_the_nar_its_hashes_and_bounded_chunks_for_every_compression() {
        let t = tree(3 << 20);
        let path = t.path().join("p");
        let mut nar = Vec::new();
        nar::dump_path(&path, &mut nar).unwrap();
        for c in [
            Compression::None,
            Compression::default(),
            Compression::Zstd {
                level: 3,
                threads: 2,
            },
            Compression::Xz { level: 1 },
        ] {
            let chunk = 64 << 10;
            // A channel of one: the producer waits for the reader (backpressure).
            let (got, chunks) = run(&path, c, chunk, 1);
            assert!(
                chunks.iter().all(|b| !b.is_empty() && b.len() <= chunk),
                "{c}"
            );
            let file: Vec<u8> = chunks.concat();
            assert_eq!(got.file_size, file.len() as u64, "{c}");
            assert_eq!(got.file_hash, Sha256::digest(&file), "{c}");
            assert_eq!(decompress(c, &file), nar, "{c}");
            assert_eq!(got.nar_size, nar.len() as u64, "{c}");
            assert_eq!(got.nar_hash, Sha256::digest(&nar), "{c}");
            if c != Compression::None {
                assert!(file.len() < nar.len(), "{c} did not compress");
            }
        }
    }

    #[test]
    fn multithreaded_zstd_for_large_nars_decodes_to_the_same_nar() {
        let t = tree(10 << 20);
        let path = t.path().join("p");
        let (tx, mut rx) = mpsc::channel(4);
        let p = path.clone();
        let c = Compression::Zstd {
            level: 3,
            threads: 2,
        };
        // A size hint over 8 MiB turns on the worker threads.
        let producer = std::thread::spawn(move || produce(&p, c, 10 << 20, 1 << 20, tx));
        let mut file = Vec::new();
        while let Some(b) = rx.blocking_recv() {
            file.extend_from_slice(&b);
        }
        let got = producer.join().unwrap().unwrap();
        let mut nar = Vec::new();
        nar::dump_path(&path, &mut nar).unwrap();
        assert_eq!(zstd::decode_all(&file[..]).unwrap(), nar);
        assert_eq!(got.nar_hash, Sha256::digest(&nar));
    }

    #[test]
    fn a_reader_that_goes_away_stops_the_producer_with_an_error() {
        let t = tree(4 << 20);
        let path = t.path().join("p");
        let (tx, mut rx) = mpsc::channel(1);
        let producer = std::thread::spawn(move || produce(&path, Compression::None, 0, 4096, tx));
        let _first = rx.blocking_recv();
        drop(rx);
        let err = producer.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    }

    #[test]
    fn names_levels_and_parsing() {
        for (text, name, ext) in [
            ("zstd", "zstd", ".nar.zst"),
            ("xz", "xz", ".nar.xz"),
            ("none", "none", ".nar"),
        ] {
            let c: Compression = text.parse().unwrap();
            assert_eq!((c.name(), c.extension()), (name, ext));
            assert_eq!(c.to_string(), name);
        }
        assert!("lz4".parse::<Compression>().unwrap_err().contains("lz4"));
        let zstd = Compression::default();
        assert!(zstd.with_level(1).is_ok() && zstd.with_level(19).is_ok());
        assert!(zstd.with_level(0).is_err() && zstd.with_level(20).is_err());
        let xz = Compression::Xz { level: 6 };
        assert_eq!(xz.with_level(9), Ok(Compression::Xz { level: 9 }));
        assert!(xz.with_level(10).is_err() && xz.with_level(-1).is_err());
        assert!(Compression::None.with_level(3).is_err());
    }
}

//! NAR ("Nix ARchive") serialisation, byte-identical to `nix-store --dump`.
//!
//! Grammar (every string is a u64 little-endian length, the bytes, then zero padding to a
//! multiple of 8):
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <bytes>
//! symlink   = "symlink" "target" <target>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! Directory entries come in byte order of their names. Only the owner's execute bit
//! counts, as in Nix. Files are streamed, so memory does not depend on their size.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const PAD: [u8; 8] = [0; 8];
const COPY_BUF: usize = 256 * 1024;

fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

fn write_bytes<W: Write>(out: &mut W, bytes: &[u8]) -> io::Result<()> {
    out.write_all(&(bytes.len() as u64).to_le_bytes())?;
    out.write_all(bytes)?;
    out.write_all(&PAD[..padding(bytes.len() as u64)])
}

fn write_tokens<W: Write>(out: &mut W, tokens: &[&str]) -> io::Result<()> {
    tokens
        .iter()
        .try_for_each(|t| write_bytes(out, t.as_bytes()))
}

/// Writes the NAR of the filesystem object at `path` to `out`.
///
/// Fails if a file's size changes while it is read: the NAR would not match its header.
pub fn dump_path<W: Write>(path: &Path, out: &mut W) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    write_tokens(out, &["nix-archive-1"])?;
    dump_node(path, out, &mut buf)
}

fn dump_node<W: Write>(path: &Path, out: &mut W, buf: &mut [u8]) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    write_tokens(out, &["(", "type"])?;
    if ft.is_symlink() {
        let target = fs::read_link(path)?;
        write_tokens(out, &["symlink", "target"])?;
        write_bytes(out, target.as_os_str().as_bytes())?;
    } else if ft.is_file() {
        write_tokens(out, &["regular"])?;
        if meta.permissions().mode() & 0o100 != 0 {
            write_tokens(out, &["executable", ""])?;
        }
        write_tokens(out, &["contents"])?;
        dump_contents(path, meta.len(), out, buf)?;
    } else if ft.is_dir() {
        write_tokens(out, &["directory"])?;
        let mut names: Vec<OsString> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            write_tokens(out, &["entry", "(", "name"])?;
            write_bytes(out, name.as_bytes())?;
            write_tokens(out, &["node"])?;
            dump_node(&path.join(&name), out, buf)?;
            write_tokens(out, &[")"])?;
        }
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a regular file, directory or symlink, which a NAR cannot hold",
                path.display()
            ),
        ));
    }
    write_tokens(out, &[")"])
}

fn dump_contents<W: Write>(path: &Path, len: u64, out: &mut W, buf: &mut [u8]) -> io::Result<()> {
    out.write_all(&len.to_le_bytes())?;
    let mut file = File::open(path)?;
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(changed(path));
        }
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    // One more byte means the file grew after we wrote its length.
    if file.read(&mut buf[..1])? != 0 {
        return Err(changed(path));
    }
    out.write_all(&PAD[..padding(len)])
}

fn changed(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} changed size while it was read", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_file_layout() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"hello").unwrap();
        let mut out = Vec::new();
        dump_path(&f, &mut out).unwrap();
        let mut want = Vec::new();
        for t in [
            "nix-archive-1",
            "(",
            "type",
            "regular",
            "contents",
            "hello",
            ")",
        ] {
            write_bytes(&mut want, t.as_bytes()).unwrap();
        }
        assert_eq!(out, want);
    }
}

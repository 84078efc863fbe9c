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
    dump(path, out, false).map(|_| ())
}

/// As [`dump_path`], and also returns the NAR's listing, made in the same pass: the JSON
/// Nix writes as `<hash>.ls` with `write-nar-listing` (`{"version":1,"root":NODE}`, a
/// node being a directory with its `entries`, a symlink with its `target`, or a regular
/// file with its `size`, `executable` when set, and `narOffset`, where its contents start
/// in the NAR). Its size grows with the number of files, never with their sizes.
pub fn dump_path_listed<W: Write>(path: &Path, out: &mut W) -> io::Result<serde_json::Value> {
    let root = dump(path, out, true)?.unwrap_or(serde_json::Value::Null);
    Ok(serde_json::json!({ "version": 1, "root": root }))
}

fn dump<W: Write>(path: &Path, out: &mut W, list: bool) -> io::Result<Option<serde_json::Value>> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut out = Counting { inner: out, n: 0 };
    write_tokens(&mut out, &["nix-archive-1"])?;
    dump_node(path, &mut out, &mut buf, list)
}

/// Counts the bytes written: a file's `narOffset` is where its contents start.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn dump_node<W: Write>(
    path: &Path,
    out: &mut Counting<W>,
    buf: &mut [u8],
    list: bool,
) -> io::Result<Option<serde_json::Value>> {
    use serde_json::{Map, Value, json};
    let meta = fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    write_tokens(out, &["(", "type"])?;
    let listed;
    if ft.is_symlink() {
        let target = fs::read_link(path)?;
        write_tokens(out, &["symlink", "target"])?;
        write_bytes(out, target.as_os_str().as_bytes())?;
        listed = list
            .then(|| json!({"type": "symlink", "target": target.as_os_str().to_string_lossy()}));
    } else if ft.is_file() {
        write_tokens(out, &["regular"])?;
        let executable = meta.permissions().mode() & 0o100 != 0;
        if executable {
            write_tokens(out, &["executable", ""])?;
        }
        write_tokens(out, &["contents"])?;
        // The contents start after their 8-byte length.
        let offset = out.n + 8;
        dump_contents(path, meta.len(), out, buf)?;
        listed = list.then(|| {
            let mut o = Map::new();
            o.insert("type".into(), json!("regular"));
            o.insert("size".into(), json!(meta.len()));
            if executable {
                o.insert("executable".into(), json!(true));
            }
            o.insert("narOffset".into(), json!(offset));
            Value::Object(o)
        });
    } else if ft.is_dir() {
        write_tokens(out, &["directory"])?;
        let mut names: Vec<OsString> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut entries = Map::new();
        for name in names {
            write_tokens(out, &["entry", "(", "name"])?;
            write_bytes(out, name.as_bytes())?;
            write_tokens(out, &["node"])?;
            let child = dump_node(&path.join(&name), out, buf, list)?;
            write_tokens(out, &[")"])?;
            if let Some(c) = child {
                entries.insert(name.to_string_lossy().into_owned(), c);
            }
        }
        listed = list.then(|| json!({"type": "directory", "entries": entries}));
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a regular file, directory or symlink, which a NAR cannot hold",
                path.display()
            ),
        ));
    }
    write_tokens(out, &[")"])?;
    Ok(listed)
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

    #[test]
    fn the_listing_comes_with_the_same_bytes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("p");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("a"), b"hello").unwrap();
        fs::write(root.join("bin/run"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a", root.join("l")).unwrap();
        let (mut plain, mut listed) = (Vec::new(), Vec::new());
        dump_path(&root, &mut plain).unwrap();
        let ls = dump_path_listed(&root, &mut listed).unwrap();
        assert_eq!(plain, listed);
        assert_eq!(ls["version"], 1);
        let e = &ls["root"]["entries"];
        assert_eq!(
            e["l"],
            serde_json::json!({"type": "symlink", "target": "a"})
        );
        assert_eq!(e["bin"]["entries"]["run"]["executable"], true);
        assert!(e["a"].get("executable").is_none());
        // Each narOffset points at the file's bytes in the NAR.
        for (f, want) in [
            (&e["a"], &b"hello"[..]),
            (&e["bin"]["entries"]["run"], b"#!/bin/sh\n"),
        ] {
            let off = f["narOffset"].as_u64().unwrap() as usize;
            assert_eq!(f["size"].as_u64().unwrap() as usize, want.len());
            assert_eq!(&plain[off..off + want.len()], want);
        }
    }
}

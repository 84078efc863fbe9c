//! The NAR writer against the real `nix-store --dump`, byte for byte.

mod common;

use std::path::Path;
use std::process::Command;

use cachepush::format::nar;
use common::*;

fn assert_same_as_nix(path: &Path) {
    let want = run_ok(Command::new("nix-store").arg("--dump").arg(path)).stdout;
    let mut got = Vec::new();
    nar::dump_path(path, &mut got).unwrap();
    assert!(!want.is_empty());
    assert_eq!(
        got.len(),
        want.len(),
        "NAR length differs for {}",
        path.display()
    );
    assert!(got == want, "NAR bytes differ for {}", path.display());
}

#[test]
fn every_store_path_of_the_fixture_matches_nix_store_dump() {
    let top = shared_top();
    let closure = closure_of(top);
    assert_eq!(
        closure.len(),
        4,
        "dep, tree, link-to-tree, top: {closure:?}"
    );
    for p in &closure {
        assert_same_as_nix(p);
    }
}

#[test]
fn the_fixture_really_has_every_kind_of_entry() {
    // Guards the golden test above: if the fixture lost an entry kind, it would prove less.
    let tree = closure_of(shared_top())
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with("-tree"))
        .expect("tree in closure");
    let meta = |n: &str| std::fs::symlink_metadata(tree.join(n)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert!(meta("exec").permissions().mode() & 0o100 != 0);
    assert_eq!(meta("empty-file").len(), 0);
    assert_eq!(meta("one-byte").len(), 1);
    assert_eq!(meta("seven").len() % 8, 7);
    assert!(meta("empty-dir").is_dir());
    for l in ["rel-link", "nested/up-link", "abs-link-to-dep", "dangling"] {
        assert!(meta(l).file_type().is_symlink(), "{l}");
    }
    assert!(!tree.join("dangling").exists());
    assert!(meta("name with spaces").is_file());
    assert!(meta("naïve-ünïcödé-名前").is_file());
    let self_ref = std::fs::read_to_string(tree.join("self-reference")).unwrap();
    assert_eq!(self_ref.trim(), tree.to_str().unwrap());
}

#[test]
fn trees_outside_the_store_match_too() {
    // nix-store --dump works on any path; use it for cases a derivation cannot make easily.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for (i, name) in ["b", "B", "a", "A", "_x", "-y", "é", "e\u{301}", "10", "9"]
        .iter()
        .enumerate()
    {
        std::fs::write(root.join(name), vec![b'z'; i * 3]).unwrap();
    }
    std::fs::write(root.join("big"), vec![7u8; 3 * 1024 * 1024 + 5]).unwrap();
    assert_same_as_nix(&root);
    assert_same_as_nix(&root.join("big"));
    std::os::unix::fs::symlink("big", root.join("l")).unwrap();
    assert_same_as_nix(&root.join("l"));
}

//! `.narinfo` files: a store path's metadata in a binary cache.
//!
//! ```text
//! StorePath: /nix/store/<hash>-<name>
//! URL: nar/<file>.nar.zst
//! Compression: zstd
//! FileHash: sha256:<nix32>        (optional)
//! FileSize: <bytes>               (optional)
//! NarHash: sha256:<nix32>
//! NarSize: <bytes>
//! References: <base names, sorted, space-separated>   ("References: " when none)
//! Deriver: <base name>            (optional)
//! System: <system>                (optional)
//! Sig: <key name>:<base64>        (zero or more)
//! CA: <content address>           (optional)
//! ```
//!
//! Rendering follows Nix's field order exactly, so a narinfo written by Nix parses and
//! renders back to the same bytes. Parsing is strict: a duplicated, missing or malformed
//! field is an error that names its line.

use std::fmt;

use thiserror::Error;

use super::hash::Sha256;
use super::keys::{PublicKey, SecretKey, Signature};
use super::store_path::{StoreDir, StorePath};

#[derive(Debug, Error, PartialEq, Eq)]
#[error("narinfo line {line}: {why}")]
pub struct NarInfoError {
    /// 1-based line number; 0 when the problem is the file as a whole.
    pub line: usize,
    pub why: String,
}

/// A parsed or freshly built narinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_dir: StoreDir,
    pub store_path: StorePath,
    pub url: String,
    pub compression: String,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted and without duplicates, as Nix keeps them.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
    /// Fields cachepush does not know (Determinate Nix's `Provenance:`, other tools' own),
    /// kept verbatim and in order, and written back after the known ones: Nix ignores
    /// them, so must a reader, and a gateway that re-signs must not drop them. They are
    /// outside the signature's fingerprint, as in Nix.
    pub extra: Vec<(String, String)>,
}

/// The text a signature covers: `1;<path>;<NarHash>;<NarSize>;<refs, comma-joined>`.
pub fn fingerprint(
    store_dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let refs: Vec<String> = references.iter().map(|r| store_dir.display(r)).collect();
    format!(
        "1;{};{};{};{}",
        store_dir.display(path),
        nar_hash,
        nar_size,
        refs.join(",")
    )
}

impl NarInfo {
    pub fn fingerprint(&self) -> String {
        fingerprint(
            &self.store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds this key's signature, replacing an older one by the same key name.
    pub fn sign(&mut self, key: &SecretKey) {
        let sig = key.sign(&self.fingerprint());
        self.sigs.retain(|s| s.key_name() != key.name());
        self.sigs.push(sig);
    }

    /// True when some signature verifies with one of `keys`.
    pub fn is_signed_by_any(&self, keys: &[PublicKey]) -> bool {
        let fp = self.fingerprint();
        self.sigs
            .iter()
            .any(|s| keys.iter().any(|k| k.verifies(&fp, s)))
    }

    /// Parses a narinfo: the fields Nix defines strictly (an error names the line), any
    /// other field kept as it is.
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        let mut p = Fields::default();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let err = |why: String| NarInfoError { line: n, why };
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
                .ok_or_else(|| err(format!("expected 'Key: value', got {line:?}")))?;
            p.set(n, key, value).map_err(err)?;
        }
        p.finish()
    }
}

#[derive(Default)]
struct Fields {
    store: Option<(StoreDir, StorePath)>,
    url: Option<String>,
    compression: Option<String>,
    file_hash: Option<Sha256>,
    file_size: Option<u64>,
    nar_hash: Option<Sha256>,
    nar_size: Option<u64>,
    references: Option<Vec<StorePath>>,
    deriver: Option<StorePath>,
    system: Option<String>,
    sigs: Vec<Signature>,
    ca: Option<String>,
    extra: Vec<(String, String)>,
    seen: Vec<&'static str>,
}

impl Fields {
    fn once(&mut self, key: &'static str) -> Result<(), String> {
        if self.seen.contains(&key) {
            return Err(format!("duplicate field {key}"));
        }
        self.seen.push(key);
        Ok(())
    }

    fn set(&mut self, _line: usize, key: &str, v: &str) -> Result<(), String> {
        let number = |what: &str| -> Result<u64, String> {
            v.parse()
                .map_err(|_| format!("{what} {v:?} is not a whole number"))
        };
        let hash = |what: &str| -> Result<Sha256, String> {
            Sha256::parse(v).map_err(|e| format!("{what}: {e}"))
        };
        let base = |what: &str, s: &str| -> Result<StorePath, String> {
            StorePath::from_base_name(s).map_err(|e| format!("{what}: {e}"))
        };
        match key {
            "StorePath" => {
                self.once("StorePath")?;
                let (dir, _) = v
                    .rsplit_once('/')
                    .ok_or_else(|| format!("StorePath {v:?} is not an absolute store path"))?;
                let dir = StoreDir::new(dir).map_err(|e| format!("StorePath: {e}"))?;
                let path = dir.parse_path(v).map_err(|e| format!("StorePath: {e}"))?;
                self.store = Some((dir, path));
            }
            "URL" => {
                self.once("URL")?;
                if v.is_empty() {
                    return Err("URL is empty".into());
                }
                self.url = Some(v.to_owned());
            }
            "Compression" => {
                self.once("Compression")?;
                if v.is_empty() {
                    return Err("Compression is empty".into());
                }
                self.compression = Some(v.to_owned());
            }
            "FileHash" => {
                self.once("FileHash")?;
                self.file_hash = Some(hash("FileHash")?);
            }
            "FileSize" => {
                self.once("FileSize")?;
                self.file_size = Some(number("FileSize")?);
            }
            "NarHash" => {
                self.once("NarHash")?;
                self.nar_hash = Some(hash("NarHash")?);
            }
            "NarSize" => {
                self.once("NarSize")?;
                let n = number("NarSize")?;
                if n == 0 {
                    return Err("NarSize is 0".into());
                }
                self.nar_size = Some(n);
            }
            "References" => {
                self.once("References")?;
                let mut refs = v
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(|s| base("References", s))
                    .collect::<Result<Vec<_>, _>>()?;
                refs.sort();
                refs.dedup();
                self.references = Some(refs);
            }
            "Deriver" => {
                self.once("Deriver")?;
                // Nix writes "unknown-deriver" in some old caches; treat it as absent.
                if v != "unknown-deriver" {
                    self.deriver = Some(base("Deriver", v)?);
                }
            }
            "System" => {
                self.once("System")?;
                self.system = Some(v.to_owned());
            }
            "Sig" => self
                .sigs
                .push(Signature::parse(v).map_err(|e| format!("Sig: {e}"))?),
            "CA" => {
                self.once("CA")?;
                self.ca = Some(v.to_owned());
            }
            other => {
                // A field name is one word; anything else is a corrupt line, not a field.
                if other.is_empty()
                    || !other
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(format!("{other:?} is not a field name"));
                }
                self.extra.push((other.to_owned(), v.to_owned()));
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<NarInfo, NarInfoError> {
        let missing = |f: &str| NarInfoError {
            line: 0,
            why: format!("missing required field {f}"),
        };
        let (store_dir, store_path) = self.store.ok_or_else(|| missing("StorePath"))?;
        Ok(NarInfo {
            store_dir,
            store_path,
            url: self.url.ok_or_else(|| missing("URL"))?,
            // Nix reads a missing Compression as bzip2.
            compression: self.compression.unwrap_or_else(|| "bzip2".to_owned()),
            file_hash: self.file_hash,
            file_size: self.file_size,
            nar_hash: self.nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size: self.nar_size.ok_or_else(|| missing("NarSize"))?,
            references: self.references.unwrap_or_default(),
            deriver: self.deriver,
            system: self.system,
            sigs: self.sigs,
            ca: self.ca,
            extra: self.extra,
        })
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_dir.display(&self.store_path))?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {h}")?;
        }
        if let Some(s) = self.file_size {
            writeln!(f, "FileSize: {s}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash)?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        let refs: Vec<String> = self.references.iter().map(|r| r.to_string()).collect();
        writeln!(f, "References: {}", refs.join(" "))?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {d}")?;
        }
        if let Some(s) = &self.system {
            writeln!(f, "System: {s}")?;
        }
        for s in &self.sigs {
            writeln!(f, "Sig: {s}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        for (k, v) in &self.extra {
            writeln!(f, "{k}: {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "StorePath: /nix/store/0r2v93mqaf9d2zyqi8pgmyzmf879753y-top
URL: nar/0vz57xli0mykd77rimfl8cs3hy36cgmk4bc1m9vq3iwglvja19a6.nar.zst
Compression: zstd
FileHash: sha256:0vz57xli0mykd77rimfl8cs3hy36cgmk4bc1m9vq3iwglvja19a6
FileSize: 130
NarHash: sha256:0q6yj9sbg7xi8kks5cmqc38xcpprb64a18cq9d67pds7sw04di7k
NarSize: 160
References: z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep
Deriver: 13ymk1q4wh30z4fq5lf3a5d15fvb07f9-top.drv
Sig: test-1:Z11f4c7BozoGRFEhMGhtFmnYd6YykBTUGlqGQuA2ylCuk4nXNHguuNDNEbX1PNT97/gGu11uRK1GeeycHszECQ==
";

    #[test]
    fn round_trips_byte_for_byte() {
        let ni = NarInfo::parse(SAMPLE).unwrap();
        assert_eq!(ni.to_string(), SAMPLE);
        assert_eq!(ni.references.len(), 1);
        assert_eq!(
            ni.fingerprint(),
            "1;/nix/store/0r2v93mqaf9d2zyqi8pgmyzmf879753y-top;sha256:0q6yj9sbg7xi8kks5cmqc38xcpprb64a18cq9d67pds7sw04di7k;160;/nix/store/z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep"
        );
    }

    #[test]
    fn no_references_keeps_trailing_space() {
        let text = SAMPLE.replace(
            "References: z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep",
            "References: ",
        );
        let ni = NarInfo::parse(&text).unwrap();
        assert!(ni.references.is_empty());
        assert_eq!(ni.to_string(), text);
        assert!(ni.fingerprint().ends_with(";160;"));
    }

    #[test]
    fn errors_name_the_line() {
        let dup = format!("{SAMPLE}NarSize: 5\n");
        let e = NarInfo::parse(&dup).unwrap_err();
        assert_eq!(e.line, 11);
        assert!(e.why.contains("duplicate field NarSize"), "{e}");

        let bad = SAMPLE.replace("NarSize: 160", "NarSize: many");
        assert_eq!(NarInfo::parse(&bad).unwrap_err().line, 7);

        let bad = SAMPLE.replace("NarHash: sha256:0q6", "NarHash: sha256:Eq6");
        assert_eq!(NarInfo::parse(&bad).unwrap_err().line, 6);

        let no_url: String = SAMPLE
            .lines()
            .filter(|l| !l.starts_with("URL"))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = NarInfo::parse(&no_url).unwrap_err();
        assert!(e.why.contains("missing required field URL"), "{e}");

        let e = NarInfo::parse("garbage\n").unwrap_err();
        assert_eq!(e.line, 1);
    }

    #[test]
    fn sign_and_verify() {
        let mut ni = NarInfo::parse(SAMPLE).unwrap();
        let key = SecretKey::generate("cache-1").unwrap();
        ni.sign(&key);
        assert_eq!(ni.sigs.len(), 2);
        assert!(ni.is_signed_by_any(&[key.public()]));
        ni.sign(&key);
        assert_eq!(
            ni.sigs.len(),
            2,
            "re-signing replaces the same key's signature"
        );
        ni.nar_size += 1;
        assert!(!ni.is_signed_by_any(&[key.public()]));
    }

    #[test]
    fn signatures_verify_only_with_the_right_key_over_the_right_fields() {
        let trusted = SecretKey::generate("cache-1").unwrap();
        // Same name, other bytes: what a forger without the key would make.
        let impostor = SecretKey::generate("cache-1").unwrap();
        let stranger = SecretKey::generate("other-1").unwrap();
        let base = NarInfo::parse(SAMPLE).unwrap();
        let signed_by = |keys: &[&SecretKey]| {
            let mut ni = base.clone();
            ni.sigs.clear();
            for k in keys {
                // sign() replaces a signature of the same name; push to keep both.
                ni.sigs.push(k.sign(&ni.fingerprint()));
            }
            ni
        };
        let pk = [trusted.public()];
        assert!(signed_by(&[&trusted]).is_signed_by_any(&pk));
        assert!(
            !signed_by(&[&impostor]).is_signed_by_any(&pk),
            "same name, other key"
        );
        // A bogus signature first does not hide a valid one after it...
        assert!(signed_by(&[&impostor, &trusted]).is_signed_by_any(&pk));
        // ...and a valid signature by an untrusted key does not vouch for anything.
        assert!(!signed_by(&[&stranger, &impostor]).is_signed_by_any(&pk));
        // The fingerprint covers the references: changing them voids the signature.
        let mut refs = signed_by(&[&trusted]);
        refs.references.pop();
        assert!(!refs.is_signed_by_any(&pk));
        // And the store path.
        let mut path = signed_by(&[&trusted]);
        path.store_path = base.references[0].clone();
        assert!(!path.is_signed_by_any(&pk));
        // A Sig: whose base64 is the wrong length is refused when parsed.
        let bad = SAMPLE.replace("\nSig: ", "\nSig: cache-1:AAAA\nSig: ");
        assert!(NarInfo::parse(&bad).is_err());
    }

    /// Fields written by other tools are kept, in order, and written back; the known
    /// fields stay strict, and the signature (whose fingerprint ignores them) still holds.
    #[test]
    fn unknown_fields_are_kept_verbatim_and_outside_the_signature() {
        let key = SecretKey::generate("cache-1").unwrap();
        let mut signed = NarInfo::parse(SAMPLE).unwrap();
        signed.sigs.clear();
        signed.sign(&key);
        let extra = "Provenance: {\"flake\":\"github:o/r\",\"attr\":\"hello\"}\nX-Tool-Field: 1 2  3\nEmpty:\n";
        let text = format!("{signed}{extra}");
        let ni = NarInfo::parse(&text).unwrap();
        assert_eq!(
            ni.extra,
            vec![
                (
                    "Provenance".to_owned(),
                    "{\"flake\":\"github:o/r\",\"attr\":\"hello\"}".to_owned()
                ),
                ("X-Tool-Field".to_owned(), "1 2  3".to_owned()),
                ("Empty".to_owned(), String::new()),
            ]
        );
        assert_eq!(ni.to_string().replace("Empty: \n", "Empty:\n"), text);
        assert!(ni.is_signed_by_any(&[key.public()]));
        // Known fields are as strict as before, and a line that is no field is refused.
        assert!(NarInfo::parse(&format!("{text}NarSize: 7\n")).is_err());
        assert!(NarInfo::parse(&format!("{text}Bad Key: x\n")).is_err());
        assert!(NarInfo::parse(&format!("{text}no colon here\n")).is_err());
    }
}

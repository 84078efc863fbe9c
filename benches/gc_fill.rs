//! Fills a bucket with a synthetic binary cache for the gc benchmark: N narinfos in ten
//! groups (each path refers to up to three earlier paths of its group), N small NARs, a
//! `nix-cache-info`, and a pin holding every path of groups 0-8 (so gc keeps 90% and
//! deletes the rest). No Nix store is needed. Run by benches/bench.py:
//!
//!   cargo bench --bench gc_fill -- ENDPOINT BUCKET N [CONCURRENCY]
//!
//! Prints one JSON object: {"narinfos": N, "objects": M, "seconds": S}.

use std::time::Instant;

use aws_sdk_s3::config::{BehaviorVersion, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;
use cachepush::format::{Sha256, nix32};
use futures::StreamExt;

fn hash_part(i: usize) -> String {
    let d = Sha256::digest(format!("path {i}").as_bytes());
    nix32::encode(&d.as_bytes()[..20])
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [endpoint, bucket, n, rest @ ..] = args.as_slice() else {
        return Err("usage: gc_fill ENDPOINT BUCKET N [CONCURRENCY]".into());
    };
    let n: usize = n.parse()?;
    let concurrency: usize = rest.first().map_or(Ok(64), |c| c.parse())?;
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .load()
        .await;
    let conf = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .build();
    let client = aws_sdk_s3::Client::from_conf(conf);

    let mut objects: Vec<(String, Vec<u8>)> = Vec::with_capacity(2 * n + 2);
    objects.push((
        "nix-cache-info".into(),
        b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n".to_vec(),
    ));
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut pinned = Vec::new();
    for i in 0..n {
        let group = i % 10;
        let h = hash_part(i);
        let nar = format!("synthetic NAR {i}\n").into_bytes();
        let nar_hash = Sha256::digest(&nar);
        let file_hash = nar_hash;
        let mut refs = vec![format!("{h}-p{i}")];
        // Up to three earlier paths of the same group (indices i - 10k).
        for _ in 0..(next() % 4) {
            let back = 1 + (next() as usize % 50);
            if let Some(j) = i.checked_sub(back * 10) {
                refs.push(format!("{}-p{j}", hash_part(j)));
            }
        }
        refs.sort();
        refs.dedup();
        let nar_key = format!("nar/{}.nar", nar_hash.nix32());
        let narinfo = format!(
            "StorePath: /nix/store/{h}-p{i}\nURL: {nar_key}\nCompression: none\nFileHash: sha256:{}\nFileSize: {}\nNarHash: sha256:{}\nNarSize: {}\nReferences: {}\n",
            file_hash.nix32(),
            nar.len(),
            nar_hash.nix32(),
            nar.len(),
            refs.join(" ")
        );
        if group < 9 {
            pinned.push(format!("\"/nix/store/{h}-p{i}\""));
        }
        objects.push((format!("{h}.narinfo"), narinfo.into_bytes()));
        objects.push((nar_key, nar));
    }
    objects.push((
        "cachepush/pins/bench.json".into(),
        format!(
            "{{\"version\":1,\"name\":\"bench\",\"revisions\":[{{\"added\":0,\"paths\":[{}]}}]}}",
            pinned.join(",")
        )
        .into_bytes(),
    ));

    let started = Instant::now();
    let count = objects.len();
    let failed = futures::stream::iter(objects.into_iter().map(|(key, body)| {
        let client = client.clone();
        async move {
            client
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(ByteStream::from(body))
                .send()
                .await
        }
    }))
    .buffer_unordered(concurrency)
    .filter(|r| std::future::ready(r.is_err()))
    .count()
    .await;
    if failed > 0 {
        return Err(format!("{failed} PUTs failed").into());
    }
    println!(
        "{{\"narinfos\": {n}, \"objects\": {count}, \"seconds\": {:.2}}}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

//! The upload floor for the benchmarks: raw PUTs of a given number of objects with given
//! sizes, at high concurrency, with nothing else going on (no NAR, no hashing, no
//! compression, no ordering). Run by benches/bench.py:
//!
//!   cargo bench --bench put_floor -- ENDPOINT BUCKET SIZES_FILE [CONCURRENCY]
//!
//! Prints one JSON object: {"objects": N, "bytes": B, "seconds": S}.

use std::time::Instant;

use aws_sdk_s3::config::{BehaviorVersion, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [endpoint, bucket, sizes_file, rest @ ..] = args.as_slice() else {
        return Err("usage: put_floor ENDPOINT BUCKET SIZES_FILE [CONCURRENCY]".into());
    };
    let concurrency: usize = rest.first().map_or(Ok(64), |c| c.parse())?;
    let sizes: Vec<usize> = std::fs::read_to_string(sizes_file)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse())
        .collect::<Result<_, _>>()?;
    // Real bytes from a real binary, repeated as needed; content does not matter here.
    let source = std::fs::read("/bin/sh")?;
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let mut pool = Vec::with_capacity(largest);
    while pool.len() < largest {
        pool.extend_from_slice(&source);
    }
    let pool = Bytes::from(pool);

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

    let started = Instant::now();
    let total: usize = sizes.iter().sum();
    let results = futures::stream::iter(sizes.iter().enumerate().map(|(i, &n)| {
        let client = client.clone();
        let body = pool.slice(..n);
        async move {
            client
                .put_object()
                .bucket(bucket)
                .key(format!("floor/{i:06}"))
                .body(ByteStream::from(body))
                .send()
                .await
        }
    }))
    .buffer_unordered(concurrency)
    .collect::<Vec<_>>()
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        return Err(format!("{failed} PUTs failed").into());
    }
    println!(
        "{{\"objects\": {}, \"bytes\": {total}, \"seconds\": {seconds:.4}}}",
        sizes.len()
    );
    Ok(())
}

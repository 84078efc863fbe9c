//! The real S3 servers started once per test run by `scripts/test.sh` (SeaweedFS and Ceph
//! RADOS Gateway), reached through the same aws-sdk-s3 the product uses.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;

pub const REGION: &str = "us-east-1";

/// One running S3 server.
pub struct S3 {
    pub name: &'static str,
    pub endpoint: String,
    access_key: String,
    pub secret_key: String,
    client: Client,
    rt: tokio::runtime::Runtime,
}

fn env_or_panic(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: the S3 integration tests need the servers that scripts/test.sh \
             starts. Run `scripts/test.sh`, or start them yourself with \
             `scripts/s3-servers.sh start .cache/s3 && . .cache/s3/env` before `cargo test`"
        )
    })
}

impl S3 {
    fn connect(name: &'static str, endpoint_var: &str) -> S3 {
        let endpoint = env_or_panic(endpoint_var);
        let access_key = env_or_panic("CACHEPUSH_TEST_ACCESS_KEY");
        let secret_key = env_or_panic("CACHEPUSH_TEST_SECRET_KEY");
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&endpoint)
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .credentials_provider(Credentials::new(
                &access_key,
                &secret_key,
                None,
                None,
                "test",
            ))
            .build();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        S3 {
            name,
            endpoint,
            access_key,
            secret_key,
            client: Client::from_conf(conf),
            rt,
        }
    }

    pub fn seaweedfs() -> S3 {
        S3::connect("seaweedfs", "CACHEPUSH_TEST_SEAWEEDFS")
    }

    pub fn ceph() -> S3 {
        S3::connect("ceph", "CACHEPUSH_TEST_CEPH")
    }

    /// Both servers; every S3 test runs on each.
    pub fn all() -> Vec<S3> {
        vec![S3::seaweedfs(), S3::ceph()]
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// A new, empty bucket with a name no other test uses.
    pub fn new_bucket(&self, tag: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "t-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let name: String = name.chars().take(63).collect();
        self.block_on(self.client.create_bucket().bucket(&name).send())
            .unwrap_or_else(|e| panic!("{}: create bucket {name}: {e:?}", self.name));
        name
    }

    /// A bucket and prefix whose objects anonymous HTTP clients can read, as a public-read
    /// cache is. SeaweedFS grants that per bucket in its identity file (bucket `public`,
    /// see scripts/s3-servers.sh), so each test gets its own prefix there; Ceph takes a
    /// bucket policy.
    pub fn new_public_cache(&self, tag: &str) -> (String, String) {
        if self.name == "seaweedfs" {
            let bucket = "public".to_owned();
            // Creating it twice is fine: every test asks, one wins.
            let _ = self.block_on(self.client.create_bucket().bucket(&bucket).send());
            let prefix = self.new_bucket_name_only(tag);
            (bucket, prefix)
        } else {
            let bucket = self.new_bucket(tag);
            let policy = format!(
                r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":"*","Action":["s3:GetObject"],"Resource":["arn:aws:s3:::{bucket}/*"]}}]}}"#
            );
            self.block_on(
                self.client
                    .put_bucket_policy()
                    .bucket(&bucket)
                    .policy(policy)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("{}: bucket policy: {e:?}", self.name));
            (bucket, String::new())
        }
    }

    fn new_bucket_name_only(&self, tag: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// `s3://BUCKET[/PREFIX]?endpoint=...&region=...` for cachepush.
    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        let path = if prefix.is_empty() {
            bucket.to_owned()
        } else {
            format!("{bucket}/{prefix}")
        };
        format!("s3://{path}?endpoint={}&region={REGION}", self.endpoint)
    }

    /// The plain-HTTP URL of a public-read cache, as Nix substitutes from it.
    pub fn http_url(&self, bucket: &str, prefix: &str) -> String {
        if prefix.is_empty() {
            format!("{}/{bucket}", self.endpoint)
        } else {
            format!("{}/{bucket}/{prefix}", self.endpoint)
        }
    }

    /// Credentials for a cachepush child process, through the standard AWS variables.
    pub fn creds(&self, cmd: &mut Command) {
        cmd.env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    }

    /// The read-only identity's credentials (it may read and list, never write; on Ceph
    /// only buckets that [`Self::grant_reader`] opened to it).
    pub fn reader_creds(&self, cmd: &mut Command) {
        self.creds(cmd);
        cmd.env(
            "AWS_ACCESS_KEY_ID",
            env_or_panic("CACHEPUSH_TEST_READ_ACCESS_KEY"),
        )
        .env(
            "AWS_SECRET_ACCESS_KEY",
            env_or_panic("CACHEPUSH_TEST_READ_SECRET_KEY"),
        );
    }

    /// Lets the read-only identity read and list `bucket` (Ceph: a bucket policy naming
    /// its user; SeaweedFS grants it every bucket already).
    pub fn grant_reader(&self, bucket: &str) {
        if self.name != "ceph" {
            return;
        }
        let policy = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{{"AWS":["arn:aws:iam:::user/reader"]}},"Action":["s3:GetObject","s3:ListBucket"],"Resource":["arn:aws:s3:::{bucket}","arn:aws:s3:::{bucket}/*"]}}]}}"#
        );
        self.block_on(
            self.client
                .put_bucket_policy()
                .bucket(bucket)
                .policy(policy)
                .send(),
        )
        .unwrap_or_else(|e| panic!("{}: bucket policy: {e:?}", self.name));
    }

    /// Every key in the bucket under the folder `prefix` (`a` means `a/...`, never `ab/...`:
    /// tests that share the SeaweedFS `public` bucket each have a prefix of their own).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let prefix = folder(prefix);
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let r = self
                .block_on(
                    self.client
                        .list_objects_v2()
                        .bucket(bucket)
                        .prefix(&prefix)
                        .set_continuation_token(token.take())
                        .send(),
                )
                .unwrap_or_else(|e| panic!("{}: list {bucket}: {e:?}", self.name));
            out.extend(
                r.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
            match r.next_continuation_token() {
                Some(t) if r.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.sort();
        out
    }

    /// Content-Type, Content-Encoding and length of an object, or None when absent.
    pub fn head(&self, bucket: &str, key: &str) -> Option<(String, Option<String>, u64)> {
        let r = self.block_on(self.client.head_object().bucket(bucket).key(key).send());
        match r {
            Ok(o) => Some((
                o.content_type().unwrap_or_default().to_owned(),
                o.content_encoding().map(str::to_owned),
                o.content_length().unwrap_or(0) as u64,
            )),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => None,
            Err(e) => panic!("{}: HEAD {key}: {e:?}", self.name),
        }
    }

    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        self.block_on(async {
            let o = self
                .client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{}: GET {key}: {e:?}", self.name));
            o.body.collect().await.expect("read body").to_vec()
        })
    }

    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        self.block_on(
            self.client
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(ByteStream::from(body.to_vec()))
                .send(),
        )
        .unwrap_or_else(|e| panic!("{}: PUT {key}: {e:?}", self.name));
    }

    pub fn delete(&self, bucket: &str, key: &str) {
        self.block_on(self.client.delete_object().bucket(bucket).key(key).send())
            .unwrap_or_else(|e| panic!("{}: DELETE {key}: {e:?}", self.name));
    }

    /// Multipart uploads under the folder `prefix`, started and neither completed nor
    /// aborted. Scoped to the prefix: another test's upload in flight in a shared bucket is
    /// not this test's leftover.
    pub fn open_uploads(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let r = self
            .block_on(
                self.client
                    .list_multipart_uploads()
                    .bucket(bucket)
                    .prefix(folder(prefix))
                    .send(),
            )
            .unwrap_or_else(|e| panic!("{}: list uploads: {e:?}", self.name));
        r.uploads()
            .iter()
            .filter_map(|u| u.key().map(str::to_owned))
            .collect()
    }
}

/// `a` → `a/`; empty stays empty (the whole bucket).
fn folder(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_owned()
    } else {
        format!("{prefix}/")
    }
}

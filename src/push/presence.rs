//! Which narinfos a target already has: HEADs from one end, a listing from the other.
//!
//! Nix's own S3 store asks with one HEAD per path. For a large closure one listing page
//! answers up to 1,000 of those questions at once, but a bucket may hold millions of
//! narinfos, so listing all of it could cost far more than the HEADs. Both run at once:
//! the listing walks the keys upward from the smallest, HEADs take the largest key nobody
//! has answered yet, and they meet wherever the cheaper one got to. Against an empty or
//! small bucket a couple of pages answer everything; against a huge one the listing covers
//! a slice and the HEADs do the rest, never many more requests than HEADs alone.
//!
//! A listing that fails (no `s3:ListBucket` permission, say) only stops the listing; the
//! HEADs answer what it did not.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use futures::future::{Either, select};
use futures::{StreamExt, TryStreamExt};

use crate::storage::{Storage, StorageError, TopPage};

/// Closures smaller than this are checked with HEADs only: a listing page of a big bucket
/// costs the server more than a few dozen HEADs.
pub const LIST_MIN_KEYS: usize = 100;

/// Keys per listing page (S3's maximum).
const PAGE: i32 = 1000;

const UNKNOWN: u8 = 0;
const ABSENT: u8 = 1;
const PRESENT: u8 = 2;

/// Whether each of `keys` exists in `storage`, and why the listing stopped early if it
/// failed (the answers are complete either way).
pub async fn presence<S: Storage>(
    storage: &S,
    keys: &[String],
    concurrency: usize,
    list: bool,
) -> Result<(Vec<bool>, Option<StorageError>), StorageError> {
    if let Some(answers) = storage.exists_many(keys).await? {
        return Ok((answers, None));
    }
    let list = list && keys.len() >= LIST_MIN_KEYS;
    resolve(
        keys,
        concurrency,
        |key: String| async move { storage.head(&key).await.map(|h| h.is_some()) },
        list.then_some(|next| storage.list_top_page(next, PAGE)),
    )
    .await
}

/// Where the listing (from below) and the HEADs (from above) have got to, as positions in
/// the sorted keys: everything below `lo` was answered by the listing, everything from
/// `hi` up is answered or being answered by a HEAD.
struct Meet {
    lo: usize,
    hi: usize,
}

/// [`presence`] with the two kinds of question as functions, so the meeting logic can be
/// tested on its own. `list` answers `Ok(None)` when the backend cannot list.
pub async fn resolve<H, HF, L, LF>(
    keys: &[String],
    concurrency: usize,
    head: H,
    list: Option<L>,
) -> Result<(Vec<bool>, Option<StorageError>), StorageError>
where
    H: Fn(String) -> HF,
    HF: Future<Output = Result<bool, StorageError>>,
    L: FnMut(Option<String>) -> LF,
    LF: Future<Output = Result<Option<TopPage>, StorageError>>,
{
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| keys[a].cmp(&keys[b]));
    let answers: Vec<AtomicU8> = keys.iter().map(|_| AtomicU8::new(UNKNOWN)).collect();
    let meet = Mutex::new(Meet {
        lo: 0,
        hi: keys.len(),
    });
    let lock = || meet.lock().unwrap_or_else(|e| e.into_inner());

    // Claimed lazily, one as each HEAD slot frees up, so the listing's progress is seen.
    let claims = std::iter::from_fn(|| {
        let mut m = lock();
        (m.lo < m.hi).then(|| {
            m.hi -= 1;
            order[m.hi]
        })
    });
    let heads = futures::stream::iter(claims)
        .map(|i| {
            let answer = &answers[i];
            let asked = head(keys[i].clone());
            async move {
                let found = asked.await?;
                answer.store(if found { PRESENT } else { ABSENT }, Ordering::Relaxed);
                Ok::<_, StorageError>(())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<()>();

    let listing = async {
        let mut list = list?;
        let mut next = None;
        loop {
            {
                let m = lock();
                if m.lo >= m.hi {
                    return None;
                }
            }
            let page = match list(next.take()).await {
                Ok(Some(page)) => page,
                Ok(None) => return None,
                Err(e) => return Some(e),
            };
            for k in &page.keys {
                if let Ok(pos) = order.binary_search_by(|&i| keys[i].as_str().cmp(k)) {
                    answers[order[pos]].store(PRESENT, Ordering::Relaxed);
                }
            }
            let mut m = lock();
            while m.lo < m.hi
                && page
                    .covered_to
                    .as_ref()
                    .is_none_or(|c| keys[order[m.lo]] <= *c)
            {
                // Listed as far as this key and not seen: absent. (A HEAD may have claimed
                // it meanwhile only if lo < hi no longer holds, which ends the loop.)
                let _ = answers[order[m.lo]].compare_exchange(
                    UNKNOWN,
                    ABSENT,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                m.lo += 1;
            }
            match page.next {
                Some(n) if page.covered_to.is_some() => next = Some(n),
                _ => {
                    m.lo = m.hi;
                    return None;
                }
            }
        }
    };

    let heads = std::pin::pin!(heads);
    let listing = std::pin::pin!(listing);
    let list_error = match select(heads, listing).await {
        // Every key was claimed: each is answered by a HEAD or by the listing. A listing
        // page still in flight is dropped.
        Either::Left((done, _)) => {
            done?;
            None
        }
        Either::Right((list_error, heads)) => {
            heads.await?;
            list_error
        }
    };
    let out = answers
        .iter()
        .map(|a| a.load(Ordering::Relaxed) == PRESENT)
        .collect();
    Ok((out, list_error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicUsize;

    /// A bucket of `stored` keys answering HEADs and pages of `page` keys, counting both.
    struct Fake {
        stored: BTreeSet<String>,
        page: usize,
        heads: AtomicUsize,
        pages: AtomicUsize,
        fail_list_after: Option<usize>,
    }

    impl Fake {
        fn new(stored: impl IntoIterator<Item = String>, page: usize) -> Self {
            Fake {
                stored: stored.into_iter().collect(),
                page,
                heads: AtomicUsize::new(0),
                pages: AtomicUsize::new(0),
                fail_list_after: None,
            }
        }

        fn page_after(&self, next: Option<String>) -> Result<Option<TopPage>, StorageError> {
            let n = self.pages.fetch_add(1, Ordering::SeqCst);
            if self.fail_list_after.is_some_and(|f| n >= f) {
                return Err(StorageError::Denied {
                    op: "LIST",
                    key: String::new(),
                    message: "AccessDenied".into(),
                });
            }
            let start = next.unwrap_or_default();
            let keys: Vec<String> = self
                .stored
                .iter()
                .filter(|k| **k > start)
                .take(self.page)
                .cloned()
                .collect();
            let more = keys
                .last()
                .is_some_and(|l| self.stored.range(l.clone()..).nth(1).is_some());
            let last = keys.last().cloned();
            Ok(Some(TopPage {
                keys,
                covered_to: if more { last.clone() } else { None },
                next: if more { last } else { None },
            }))
        }

        async fn run(&self, keys: &[String], list: bool) -> (Vec<bool>, Option<StorageError>) {
            resolve(
                keys,
                8,
                |k: String| async move {
                    self.heads.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok(self.stored.contains(&k))
                },
                list.then_some(|next| async move {
                    tokio::task::yield_now().await;
                    self.page_after(next)
                }),
            )
            .await
            .unwrap()
        }
    }

    fn key(i: usize) -> String {
        format!("{:032}.narinfo", i.wrapping_mul(2654435761) % 1_000_000_007)
    }

    fn truth(fake: &Fake, keys: &[String]) -> Vec<bool> {
        keys.iter().map(|k| fake.stored.contains(k)).collect()
    }

    #[tokio::test]
    async fn answers_match_the_bucket_whatever_its_size() {
        let closure: Vec<String> = (0..300).map(key).collect();
        for (stored, page) in [
            (vec![], 1000),
            ((0..150).map(key).collect::<Vec<_>>(), 1000),
            ((0..150).map(key).collect(), 7),
            ((100..5000).map(key).collect(), 50),
            ((0..300).map(key).chain(["nar/".into()]).collect(), 1),
        ] {
            let fake = Fake::new(stored, page);
            let (got, err) = fake.run(&closure, true).await;
            assert!(err.is_none());
            assert_eq!(got, truth(&fake, &closure), "page {page}");
            let (heads, pages) = (fake.heads.into_inner(), fake.pages.into_inner());
            assert!(heads + pages > 0);
            assert!(heads <= closure.len(), "{heads} HEADs");
            // Never many more requests than HEADs alone would cost.
            assert!(
                heads + pages <= closure.len() + 2,
                "page {page}: {heads} HEADs + {pages} pages for {} paths",
                closure.len()
            );
        }
    }

    #[tokio::test]
    async fn a_small_bucket_is_answered_by_the_listing_not_by_heads() {
        let closure: Vec<String> = (0..2000).map(key).collect();
        let fake = Fake::new((0..1000).map(key), 1000);
        let (got, _) = fake.run(&closure, true).await;
        assert_eq!(got, truth(&fake, &closure));
        // Two pages answer all 2,000; the HEADs that started before the first page came
        // back are the only others.
        assert!(fake.pages.load(Ordering::SeqCst) <= 2);
        assert!(fake.heads.load(Ordering::SeqCst) < 100, "{:?}", fake.heads);

        // And the same closure with HEADs only, for comparison.
        let fake = Fake::new((0..1000).map(key), 1000);
        let (got, _) = fake.run(&closure, false).await;
        assert_eq!(got, truth(&fake, &closure));
        assert_eq!(fake.heads.load(Ordering::SeqCst), 2000);
        assert_eq!(fake.pages.load(Ordering::SeqCst), 0);
    }

    /// A closure whose keys sort far above everything stored: the listing has nothing to
    /// say about them until its end, so the HEADs answer and the listing stops with them.
    #[tokio::test]
    async fn a_closure_sorting_after_a_large_bucket_does_not_walk_the_bucket() {
        let closure: Vec<String> = (0..300).map(|i| format!("z{:031}.narinfo", i)).collect();
        let fake = Fake::new((0..20_000).map(key), 50);
        let (got, err) = fake.run(&closure, true).await;
        assert!(err.is_none());
        assert_eq!(got, truth(&fake, &closure));
        let (heads, pages) = (fake.heads.into_inner(), fake.pages.into_inner());
        assert!(heads <= closure.len(), "{heads} HEADs");
        // The listing runs beside the HEADs and stops when they are done: at most about a
        // page per wave of 8 HEADs, never the bucket's 400 pages.
        assert!(
            pages <= closure.len() / 8 + 2,
            "{pages} pages of a 400-page bucket listed for 300 paths"
        );
    }

    #[tokio::test]
    async fn a_failing_listing_leaves_the_rest_to_heads() {
        let closure: Vec<String> = (0..400).map(key).collect();
        for fail_after in [0, 1, 3] {
            let mut fake = Fake::new((0..250).map(key), 20);
            fake.fail_list_after = Some(fail_after);
            let (got, err) = fake.run(&closure, true).await;
            assert_eq!(got, truth(&fake, &closure), "fail after {fail_after}");
            assert!(matches!(err, Some(StorageError::Denied { .. })), "{err:?}");
        }
    }

    #[tokio::test]
    async fn a_head_error_is_the_answer() {
        let keys: Vec<String> = (0..10).map(key).collect();
        let r = resolve(
            &keys,
            4,
            |_k: String| async { Err::<bool, _>(StorageError::Config("HEAD failed".into())) },
            None::<fn(Option<String>) -> std::future::Ready<Result<Option<TopPage>, StorageError>>>,
        )
        .await;
        assert!(matches!(r, Err(StorageError::Config(_))));
    }
}

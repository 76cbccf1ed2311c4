//! Work spread over the machine's cores, with results in the order of the inputs: what the
//! user sees never depends on which thread did what.

use std::sync::atomic::{AtomicUsize, Ordering};

/// `f` of each item, on as many threads as there are cores, in the items' order. Items go to
/// whichever thread is free next (their costs vary: files of different sizes, programs the
/// verifier takes longer over). One item, or one core, runs on the calling thread. A panic in
/// `f` is raised again here.
pub fn map_in_order<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let done: Vec<Vec<(usize, R)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else {
                            return mine;
                        };
                        mine.push((i, f(item)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut out: Vec<(usize, R)> = done.into_iter().flatten().collect();
    // Each index was taken by exactly one worker: sorting by it restores the items' order.
    out.sort_unstable_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_order_of_the_items() {
        let items: Vec<u64> = (0..1000).collect();
        // Uneven costs, so threads finish out of order.
        let out = map_in_order(&items, |i| {
            if i % 7 == 0 {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            i * 3
        });
        assert_eq!(out, items.iter().map(|i| i * 3).collect::<Vec<_>>());
        assert!(map_in_order(&[] as &[u8], |b| *b).is_empty());
    }

    #[test]
    #[should_panic(expected = "item 5")]
    fn a_panic_in_a_worker_reaches_the_caller() {
        let items: Vec<u32> = (0..10).collect();
        map_in_order(&items, |i| {
            if *i == 5 {
                panic!("item 5");
            }
        });
    }
}

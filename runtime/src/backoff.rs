//! Pauses between retries: exponential, capped, and for optimistic-concurrency conflicts also
//! jittered, so two writers that collided (on one instance or on two) do not collide again on
//! the same schedule.

use std::time::Duration;

/// `base_ms` doubling per attempt (attempt 1 waits `base_ms`), capped at `cap_ms`.
pub fn exponential(base_ms: u64, attempt: u32, cap_ms: u64) -> Duration {
    let ms = base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
        .min(cap_ms);
    Duration::from_millis(ms)
}

/// How many times a call that lost an optimistic-concurrency race is re-run at a growing,
/// jittered pause before its pause stops growing (events) or it gives up (HTTP: `503`).
pub const CONFLICT_RERUNS: u32 = 16;

/// The pause before conflict re-run `rerun` (1-based): a random point in the upper half of
/// `1 ms << rerun`, capped at `cap_ms`.
pub fn conflict(rerun: u32, cap_ms: u64) -> Duration {
    jittered(exponential(1, rerun + 1, cap_ms.max(1)), random())
}

/// `pause` scaled to a point in `[pause/2, pause]` chosen by `random`.
fn jittered(pause: Duration, random: u64) -> Duration {
    let half = pause / 2;
    let nanos = half.as_nanos() as u64;
    half + Duration::from_nanos(if nanos == 0 { 0 } else { random % (nanos + 1) })
}

fn random() -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let pauses: Vec<u64> = (1..=6)
            .map(|a| exponential(100, a, 1_000).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(
            exponential(100, u32::MAX, 1_000),
            Duration::from_millis(1_000),
            "no overflow"
        );
    }

    #[test]
    fn conflict_pauses_grow_are_capped_and_jittered() {
        for rerun in 1..=30 {
            let ceiling = exponential(1, rerun + 1, 500);
            let pause = conflict(rerun, 500);
            assert!(
                pause <= ceiling && pause >= ceiling / 2,
                "{rerun}: {pause:?}"
            );
        }
        assert_eq!(
            jittered(Duration::from_millis(8), 0),
            Duration::from_millis(4)
        );
        // Two contenders drawing pauses for the same re-run rarely draw the same one.
        let drawn: std::collections::HashSet<Duration> =
            (0..32).map(|_| conflict(10, 10_000)).collect();
        assert!(drawn.len() > 16, "{drawn:?}");
    }
}

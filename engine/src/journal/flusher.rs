//! The flusher thread: syncs what the lanes appended (group commit or on an interval),
//! publishes each lane's durable position, wakes whoever waits, and keeps rotation off
//! the writers' path by pre-creating (and prefaulting) their next segments.

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::thread;
use std::time::{Duration, Instant};

use super::lane::{LaneShared, Pos};
use super::segment::{Segment, file_name};
use super::{Shared, SyncPolicy, lock};

/// How long the flusher sleeps when there is nothing to do (a writer wakes it earlier).
const IDLE: Duration = Duration::from_millis(100);

pub(crate) fn run(shared: Arc<Shared>) {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and affects only this thread: the
    // group-commit delay is tens of µs, which the default 50 µs slack would stretch.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    let mut last_sync = Instant::now();
    let mut next_tick = Instant::now();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            sync_round(&shared);
            return;
        }
        housekeeping(&shared);
        match shared.sync {
            SyncPolicy::Group { max_delay_us } => {
                if pending(&shared) {
                    let gap = Duration::from_micros(max_delay_us);
                    let since = last_sync.elapsed();
                    if since < gap {
                        thread::park_timeout(gap - since);
                        continue;
                    }
                    last_sync = Instant::now();
                    sync_round(&shared);
                    continue;
                }
                shared.flusher_sleeping.store(true, Ordering::Relaxed);
                // Pairs with the writers' fence between publishing `written` and reading
                // `flusher_sleeping`.
                fence(Ordering::SeqCst);
                if pending(&shared) || shared.stop.load(Ordering::Acquire) {
                    shared.flusher_sleeping.store(false, Ordering::Relaxed);
                    continue;
                }
                thread::park_timeout(IDLE);
                shared.flusher_sleeping.store(false, Ordering::Relaxed);
            }
            SyncPolicy::Interval { ms } => {
                let now = Instant::now();
                if now < next_tick {
                    thread::park_timeout(next_tick - now);
                    continue;
                }
                next_tick = now + Duration::from_millis(ms);
                sync_round(&shared);
            }
            SyncPolicy::None => {
                trim(&shared);
                thread::park_timeout(IDLE);
            }
        }
    }
}

/// Whether some lane has frames not synced yet.
fn pending(shared: &Shared) -> bool {
    lock(&shared.lanes)
        .iter()
        .any(|l| l.written.load(Ordering::Acquire) > l.durable.load(Ordering::Relaxed))
}

/// Syncs every lane's new frames; when that advanced something, counts the sync and calls
/// the wake callbacks (group commit).
pub(crate) fn sync_round(shared: &Shared) {
    let t0 = Instant::now();
    let mut advanced = false;
    for lane in lock(&shared.lanes).iter() {
        match sync_lane(lane) {
            Ok(a) => advanced |= a,
            Err(e) => {
                let n = shared.sync_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::error!(lane = lane.name, error = %e, errors = n, "journal sync failed; retrying");
                }
            }
        }
    }
    if !advanced {
        return;
    }
    let ns = t0.elapsed().as_nanos() as u64;
    shared.syncs.fetch_add(1, Ordering::Relaxed);
    shared.last_sync_ns.store(ns, Ordering::Relaxed);
    shared.max_sync_ns.fetch_max(ns, Ordering::Relaxed);
    for wake in lock(&shared.wakes).iter() {
        wake();
    }
}

/// msyncs a lane from its durable position to its written one (across segments), then
/// publishes the new durable position. Whether it advanced.
fn sync_lane(lane: &LaneShared) -> std::io::Result<bool> {
    let w = Pos(lane.written.load(Ordering::Acquire));
    let d = Pos(lane.durable.load(Ordering::Relaxed));
    if w <= d {
        return Ok(false);
    }
    loop {
        let Some(seg) = lock(&lane.segs).unsynced.front().cloned() else {
            break;
        };
        if seg.segno > w.segno() {
            break;
        }
        let from = if seg.segno == d.segno() {
            d.offset()
        } else {
            0
        };
        if seg.segno < w.segno() {
            // The writer moved on: the rest of this segment is final.
            seg.sync_range(from, seg.len() - from)?;
            lock(&lane.segs).unsynced.pop_front();
            continue;
        }
        seg.sync_range(from, w.offset().saturating_sub(from))?;
        break;
    }
    lane.durable.store(w.0, Ordering::Release);
    Ok(true)
}

/// Without syncs (policy `None`): forgets segments the writer has left.
fn trim(shared: &Shared) {
    for lane in lock(&shared.lanes).iter() {
        let current = lane.segno.load(Ordering::Relaxed);
        let mut segs = lock(&lane.segs);
        while segs.unsynced.front().is_some_and(|s| s.segno < current) {
            segs.unsynced.pop_front();
        }
    }
}

/// Pre-creates the next segment of every lane past half of its current one, and
/// prefaults segments writers had to create themselves.
fn housekeeping(shared: &Shared) {
    let work: Vec<Arc<LaneShared>> = {
        let lanes = lock(&shared.lanes);
        if !lanes
            .iter()
            .any(|l| l.want_next.load(Ordering::Acquire) || lock(&l.segs).prefault.is_some())
        {
            return;
        }
        lanes.iter().cloned().collect()
    };
    for lane in work {
        if let Some(seg) = lock(&lane.segs).prefault.take() {
            seg.prefault(0);
        }
        if !lane.want_next.swap(false, Ordering::AcqRel) || lock(&lane.segs).next.is_some() {
            continue;
        }
        let made = shared.alloc_segno().and_then(|segno| {
            let path = shared.dir.join(file_name(lane.name, segno));
            Segment::create(
                path,
                segno,
                shared.segment_bytes,
                shared.syncs(),
                true,
                shared.sealer.as_ref(),
            )
        });
        match made {
            Ok(seg) => {
                let mut segs = lock(&lane.segs);
                if segs.next.is_none() && seg.segno > lane.segno.load(Ordering::Relaxed) {
                    segs.next = Some(Arc::new(seg));
                } else {
                    let _ = std::fs::remove_file(&seg.path);
                }
            }
            Err(e) => {
                tracing::warn!(lane = lane.name, error = %e, "could not pre-create the next journal segment; the writer will create it");
            }
        }
    }
}

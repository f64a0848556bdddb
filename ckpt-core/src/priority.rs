//! The CPU priority of background checkpoint threads.
//!
//! A save returns once the state is copied into the arena; the persist thread and the encoder
//! threads then write it out while training goes on. On a host with few cores they compete with
//! the training step for CPU. Lowering their priority lets the scheduler give the step the core
//! first: the persist takes longer only while the step actually wants every core.
//!
//! The priority is per thread (Linux schedules threads, and `setpriority(PRIO_PROCESS, tid)` and
//! `sched_setscheduler(0, ..)` act on the calling thread only), and threads inherit it from the
//! thread that spawns them. An unprivileged thread cannot raise its priority again, so it is set
//! once, on threads that only ever do background work.

use crate::error::{Error, Result};

/// Nice value of [`Priority::Nice`]: about a tenth of a nice-0 thread's CPU share when both want
/// the same core.
pub const NICE_VALUE: i32 = 10;

/// CPU priority of the threads that persist a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// Unchanged: the threads compete with training as equals.
    Normal,
    /// Nice 10 (`setpriority`): training gets about ten times the CPU share when both are runnable
    /// on one core, yet a persist still progresses on a busy host.
    #[default]
    Nice,
    /// `SCHED_IDLE`: the threads run only on an otherwise idle core. Training never waits for
    /// them, but a host whose cores are all busy starves the persist, and the next save then waits
    /// for a free slot.
    Idle,
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Priority::Normal => "normal",
            Priority::Nice => "nice",
            Priority::Idle => "idle",
        })
    }
}

impl std::str::FromStr for Priority {
    type Err = Error;

    /// Parses `normal`, `nice` or `idle`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "normal" => Ok(Priority::Normal),
            "nice" => Ok(Priority::Nice),
            "idle" => Ok(Priority::Idle),
            _ => Err(Error::InvalidConfig {
                field: "priority",
                reason: format!("`{s:.32}` is not a persist priority: use normal, nice or idle"),
            }),
        }
    }
}

impl Priority {
    /// Lowers the calling thread to this priority. A thread already at a lower priority stays
    /// there; [`Priority::Normal`] changes nothing. A refusal is logged, not returned: the persist
    /// works at any priority.
    pub fn apply_to_current_thread(self) {
        let done = match self {
            Priority::Normal => Ok(()),
            Priority::Nice => lower_nice(NICE_VALUE),
            Priority::Idle => set_idle(),
        };
        if let Err(e) = done {
            tracing::warn!(priority = %self, error = %e, "cannot lower the persist thread's CPU priority; it runs at normal priority");
        }
    }

    /// The calling thread's current priority, as far as these three levels tell it apart.
    pub fn of_current_thread() -> Priority {
        // SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
        let policy = unsafe { libc::sched_getscheduler(0) };
        if policy == libc::SCHED_IDLE {
            return Priority::Idle;
        }
        match current_nice() {
            Ok(n) if n > 0 => Priority::Nice,
            _ => Priority::Normal,
        }
    }
}

fn thread_id() -> libc::id_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as libc::id_t }
}

fn current_nice() -> std::io::Result<i32> {
    // getpriority may legitimately return -1, so errno tells an error apart.
    // SAFETY: __errno_location returns the calling thread's errno, valid for the thread's life.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority only reads the scheduling attributes of the given thread.
    let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, thread_id()) };
    let err = std::io::Error::last_os_error();
    if n == -1 && err.raw_os_error() != Some(0) { Err(err) } else { Ok(n) }
}

fn lower_nice(nice: i32) -> std::io::Result<()> {
    if current_nice()? >= nice {
        return Ok(());
    }
    // SAFETY: setpriority on the calling thread's own id changes only its scheduling weight.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, thread_id(), nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_idle() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for SCHED_IDLE.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_prints() {
        for p in [Priority::Normal, Priority::Nice, Priority::Idle] {
            assert_eq!(p.to_string().parse::<Priority>().unwrap(), p);
        }
        assert!("fast".parse::<Priority>().unwrap_err().to_string().contains("normal, nice or idle"));
    }

    #[test]
    fn lowering_acts_on_the_calling_thread_only() {
        let before = Priority::of_current_thread();
        for p in [Priority::Nice, Priority::Idle] {
            let seen = std::thread::spawn(move || {
                p.apply_to_current_thread();
                Priority::of_current_thread()
            })
            .join()
            .unwrap();
            assert_eq!(seen, p);
        }
        assert_eq!(Priority::of_current_thread(), before);
    }

    #[test]
    fn a_lower_nice_is_kept() {
        let seen = std::thread::spawn(|| {
            lower_nice(15).unwrap();
            Priority::Nice.apply_to_current_thread();
            current_nice().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, 15);
    }
}

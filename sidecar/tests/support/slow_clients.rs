//! Peers that hold an HTTP port's connections without finishing a request: they connect, send the
//! start of a request head and then one more byte every 500 ms, so a per-read timeout never fires.

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `n` trickling connections to `addr`; they stop trickling when dropped.
pub struct SlowClients {
    conns: Vec<TcpStream>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SlowClients {
    pub fn connect(addr: SocketAddr, n: usize) -> SlowClients {
        let conns: Vec<TcpStream> = (0..n)
            .map(|_| {
                let mut s = TcpStream::connect(addr).expect("connect a slow client");
                s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").expect("send the start of a head");
                s
            })
            .collect();
        let mut writers: Vec<TcpStream> = conns.iter().map(|c| c.try_clone().unwrap()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    for w in &mut writers {
                        // A write to a connection the server closed fails; that is expected.
                        let _ = w.write_all(b"a");
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        });
        SlowClients { conns, stop, thread: Some(thread) }
    }

    /// How many of the connections the server gave up on: closed, reset, or answered (with an
    /// error, since no request head is complete).
    pub fn given_up(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| {
                c.set_nonblocking(true).unwrap();
                let r = c.peek(&mut [0u8; 1]);
                c.set_nonblocking(false).unwrap();
                !matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
            })
            .count()
    }

    /// Waits until the server gave up on every connection (generous deadline, never asserted as a
    /// duration).
    pub fn wait_all_given_up(&self) {
        let started = std::time::Instant::now();
        while self.given_up() < self.conns.len() {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the server still holds {} of {} slow connections",
                self.conns.len() - self.given_up(),
                self.conns.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for SlowClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! Makes denied network calls as fast as it can, for the audit flood test
//! and the audit benchmark.
//!
//! `flood ADDR PORT COUNT [udp|tcp|mixed] [PACE_PER_MS]`: COUNT UDP
//! `sendto`s (default; the cheapest call a sock_addr hook sees) or TCP
//! `connect`s to ADDR:PORT; `mixed`: UDP sends, but every 64th call is a TCP
//! connect (the one timed: connect latency while sends saturate the audit
//! pipeline). With PACE_PER_MS, at most that many calls per millisecond.
//! Prints `calls N eperm N other N ns N p50_ns N p99_ns N` (latency of every
//! 64th call), and also writes it to `$PEP_FLOOD_REPORT` when set. With
//! `$PEP_FLOOD_CPU=N` it first pins itself to CPU N (the audit benchmark:
//! the flood on one core, the pipeline on the other).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: flood ADDR PORT COUNT [udp|tcp] [PACE_PER_MS]");
        std::process::exit(2);
    }
    let addr: Ipv4Addr = args[1].parse().expect("ADDR");
    let port: u16 = args[2].parse().expect("PORT");
    let count: u64 = args[3].parse().expect("COUNT");
    let mode = args.get(4).map(String::as_str).unwrap_or("udp");
    let pace: Option<u64> = args.get(5).map(|p| p.parse().expect("PACE_PER_MS"));
    if let Some(cpu) = std::env::var("PEP_FLOOD_CPU")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
    {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity
        // get valid pointers to it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            let r = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
            assert_eq!(r, 0, "pin to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    let sa = SocketAddrV4::new(addr, port);
    let raw = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*sa.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket call.
    let udp = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(udp >= 0, "socket");
    let (mut eperm, mut other) = (0u64, 0u64);
    let mut samples = Vec::with_capacity(usize::try_from(count / 64 + 1).unwrap_or(0));
    let start = Instant::now();
    for i in 0..count {
        if let Some(p) = pace
            && i % p == 0
        {
            // Pace against the clock so short stalls are made up.
            let due = Duration::from_micros(i / p * 1000);
            while start.elapsed() < due {
                std::hint::spin_loop();
            }
        }
        let t0 = (i % 64 == 0).then(Instant::now);
        let tcp = mode == "tcp" || (mode == "mixed" && t0.is_some());
        let r = if tcp {
            // SAFETY: plain socket calls on a fresh socket.
            unsafe {
                let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let r = libc::connect(s, (&raw as *const libc::sockaddr_in).cast(), len);
                libc::close(s);
                r
            }
        } else {
            // SAFETY: valid buffer and address.
            unsafe {
                libc::sendto(
                    udp,
                    b"x".as_ptr().cast(),
                    1,
                    0,
                    (&raw as *const libc::sockaddr_in).cast(),
                    len,
                ) as i32
            }
        };
        if let Some(t0) = t0 {
            samples.push(t0.elapsed().as_nanos() as u64);
        }
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
                eperm += 1;
            } else {
                other += 1;
            }
        } else {
            other += 1;
        }
    }
    let ns = start.elapsed().as_nanos();
    samples.sort_unstable();
    let pct = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    let report = format!(
        "calls {count} eperm {eperm} other {other} ns {ns} p50_ns {} p99_ns {}",
        pct(0.50),
        pct(0.99)
    );
    println!("{report}");
    if let Some(path) = std::env::var_os("PEP_FLOOD_REPORT") {
        std::fs::write(&path, format!("{report}\n")).expect("write PEP_FLOOD_REPORT");
    }
}

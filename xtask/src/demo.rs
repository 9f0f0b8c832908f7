//! `cargo xtask demo`: the main job on an embedded default policy.
//!
//! Builds pep-agent, starts two loopback HTTP servers, and runs curl under
//! `examples/demo.yaml`: one request allowed, one denied in the kernel, with
//! the audit stream printed live in compact form. The files part needs BPF
//! LSM: where the host refuses it, it runs inside the VM, and says so.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    process::Command,
    time::Duration,
};

use anyhow::{Result, bail};

use crate::{setup, vm};

fn http_server(ip: &str) -> Result<u16> {
    let l = TcpListener::bind((ip, 0))?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
        }
    });
    Ok(port)
}

pub fn run() -> Result<()> {
    setup::setup()?;
    let root = vm::workspace_root();
    if !Command::new("cargo")
        .args(["build", "--package", "pep-agent"])
        .current_dir(&root)
        .status()?
        .success()
    {
        bail!("build failed");
    }
    let bin = root.join("target/debug/pep-agent");
    let policy = root.join("examples/demo.yaml");
    let allowed = http_server("127.0.0.1")?;
    let denied = http_server("127.0.0.2")?;
    println!(
        "== network: policy {} allows TCP to 127.0.0.1 only",
        policy.display()
    );
    let script = format!(
        "echo '$ curl http://127.0.0.1:{allowed}/'; curl -sS --max-time 5 http://127.0.0.1:{allowed}/ || true; \
         echo '$ curl http://169.254.169.254/ (cloud metadata)'; curl -sS --max-time 5 http://169.254.169.254/ || true; \
         echo '$ curl http://[::ffff:169.254.169.254]/ (IPv4-mapped IPv6)'; curl -sS --max-time 5 'http://[::ffff:169.254.169.254]/' || true; \
         echo '$ curl http://127.0.0.2:{denied}/'; curl -sS --max-time 5 http://127.0.0.2:{denied}/ || true"
    );
    let log = root.join("target/demo-audit.jsonl");
    let _ = std::fs::remove_file(&log);
    let st = Command::new(&bin)
        .args(["run", "--policy"])
        .arg(&policy)
        .args(["--name", "demo", "--allow-degraded", "--audit"])
        .arg(&log)
        .args(["--", "sh", "-c", &script])
        .status()?;
    println!("== exit status {st}; audit records (pep-agent events tail -o compact):");
    Command::new(&bin)
        .args(["events", "tail", "-o", "compact", "--file"])
        .arg(&log)
        .status()?;

    let lsm = Command::new(&bin).arg("doctor").output()?;
    print!("{}", String::from_utf8_lossy(&lsm.stdout));
    println!(
        "== files: the host kernel refuses BPF LSM programs; running the files demo inside the Debian 6.1 VM"
    );
    let files_script = format!(
        "mkdir -p /tmp/ws && echo hello > /tmp/ws/notes.txt && echo SECRET=1 > /tmp/ws/.env && \
         {bin} run --policy {root}/examples/demo-files.yaml --name demo-files --audit /tmp/a.jsonl -- sh -c \
         'echo \"$ cat /tmp/ws/notes.txt\"; cat /tmp/ws/notes.txt; echo \"$ cat /tmp/ws/.env\"; cat /tmp/ws/.env; echo \"$ cat /etc/shadow\"; cat /etc/shadow; true'; \
         echo \"== denials (pep-agent events tail -o compact --verdict deny)\"; {bin} events tail -o compact --verdict deny --file /tmp/a.jsonl",
        bin = bin.display(),
        root = root.display()
    );
    let results = vm::run_in_vm(
        &[vm::VmCommand::new("demo-files", ["sh", "-c", &files_script])],
        Duration::from_secs(300),
    )?;
    for r in results {
        print!("{}", r.output);
        if !r.success() {
            bail!("the files demo failed in the VM (exit {:?})", r.exit_code);
        }
    }
    Ok(())
}

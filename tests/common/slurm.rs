//! A real one-node Slurm cluster on loopback for the tests: munge, `slurmctld` and `slurmd`
//! from Debian's packages (`scripts/test.sh` installs them; the tests install nothing), with a
//! `slurm.conf` of the test's own (free ports, its own state and spool folders), stopped by PID
//! when the cluster is dropped. Start one cluster per test binary: two clusters would share the
//! node's name and its CPUs.
//!
//! Client commands need `SLURM_CONF`: [`Cluster::env`] gives it to a command, with counting
//! `sbatch` and `squeue` first on its PATH, which log every submission and every queue read.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The folder of the running cluster (one per test binary), for [`diagnosis`].
static RUNNING: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// What a hung test prints when a cluster runs (empty otherwise): the node and the queue as
/// Slurm sees them, the ends of the daemons' logs, of the newest driver log and of the tasks'
/// output, and the state of every worker process. A hang in CI is then explained by its own
/// log.
pub fn diagnosis() -> String {
    let Some(dir) = RUNNING.lock().map(|g| g.clone()).unwrap_or(None) else {
        return String::new();
    };
    let conf = dir.join("slurm.conf");
    let run = |program: &str, args: &[&str]| -> String {
        match Command::new(Path::new("/usr/bin").join(program))
            .args(args)
            .env("SLURM_CONF", &conf)
            .output()
        {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("({program} did not run: {e})\n"),
        }
    };
    let tail = |path: &Path, n: usize| -> String {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    };
    let mut out = String::from("\n\n==== the Slurm cluster when the test gave up ====\n");
    out += &format!(
        "-- scontrol show node\n{}",
        run("scontrol", &["-o", "show", "node"])
    );
    out += &format!(
        "-- squeue\n{}",
        run(
            "squeue",
            &["--array", "--states=all", "--format=%i %T %r %N %S"]
        )
    );
    for log in ["slurmctld.log", "slurmd.log"] {
        out += &format!("-- {log} (end)\n{}\n", tail(&dir.join("log").join(log), 40));
    }
    // The newest driver log and task outputs under the test's folder (and a remote exchange's
    // task outputs in /tmp), newest first.
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = vec![];
    let mut stack = vec![dir.parent().unwrap_or(&dir).to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "log")
                && (p.to_string_lossy().ends_with(".driver.log")
                    || p.parent().is_some_and(|q| q.ends_with("logs")))
            {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    logs.push((t, p));
                }
            }
        }
    }
    for e in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
        let p = e.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("tsr-task-"))
        {
            if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                logs.push((t, p));
            }
        }
    }
    logs.sort();
    logs.reverse();
    if let Some((_, p)) = logs
        .iter()
        .find(|(_, p)| p.to_string_lossy().ends_with(".driver.log"))
    {
        out += &format!("-- {} (end)\n{}\n", p.display(), tail(p, 40));
    }
    for (_, p) in logs
        .iter()
        .filter(|(_, p)| !p.to_string_lossy().ends_with(".driver.log"))
        .take(4)
    {
        out += &format!("-- {} (end)\n{}\n", p.display(), tail(p, 15));
    }
    out += "-- worker processes (pid, state, arguments)\n";
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "worker")
            || args.first().is_some_and(|a| a.starts_with("slurmstepd"))
        {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next().unwrap_or('?'))
                .unwrap_or('?');
            out += &format!("{pid} {state} {}\n", args.join(" "));
        }
    }
    out
}

const DAEMONS: [&str; 3] = [
    "/usr/sbin/munged",
    "/usr/sbin/slurmctld",
    "/usr/sbin/slurmd",
];

pub struct Cluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    /// Folder of the counting `sbatch` (first on the PATH of prepared commands).
    pub bin: PathBuf,
    /// One line per `sbatch` call: its arguments.
    pub sbatch_log: PathBuf,
    munged: Option<Child>,
    ctld: Option<Child>,
    slurmd: Option<Child>,
}

/// A daemon ends with the test that started it, even when the test is killed.
fn die_with_test(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// This machine's short host name (Slurm's node name must equal it).
pub fn short_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    assert_eq!(rc, 0, "gethostname failed");
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    name.split('.').next().unwrap().to_string()
}

impl Cluster {
    /// Starts munge, the controller and the node daemon in `dir`, and waits until the node is
    /// idle.
    pub fn start(dir: &Path) -> Cluster {
        for d in DAEMONS {
            assert!(
                Path::new(d).exists(),
                "{d} is missing: these tests start a real Slurm; run them with scripts/test.sh, which installs slurmctld, slurmd, slurm-client and munge"
            );
        }
        for sub in ["state", "spool", "log", "bin"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let key = dir.join("munge.key");
        let mut bytes = vec![0u8; 64];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        std::fs::write(&key, bytes).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        let host = short_hostname();
        let d = dir.display();
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=tsrtest\nSlurmctldHost={host}(127.0.0.1)\nSlurmUser=root\nSlurmdUser=root\n\
                 AuthType=auth/munge\nAuthInfo=socket={d}/munge.sock\nCredType=cred/munge\n\
                 SlurmctldPort={}\nSlurmdPort={}\nStateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
                 SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\nSchedulerType=sched/backfill\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nReturnToService=2\nMpiDefault=none\n\
                 JobRequeue=1\nMaxArraySize=1001\nSlurmdTimeout=10\nKillWait=5\n\
                 NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN\n\
                 PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
                free_port(),
                free_port()
            ),
        )
        .unwrap();
        let bin = dir.join("bin");
        let sbatch_log = dir.join("sbatch.log");
        for tool in ["sbatch", "squeue"] {
            let wrapper = bin.join(tool);
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\necho \"$*\" >> '{}'\nexec /usr/bin/{tool} \"$@\"\n",
                    dir.join(format!("{tool}.log")).display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut munged = Command::new("/usr/sbin/munged");
        die_with_test(&mut munged);
        let munged = munged
            .arg("-F")
            .arg("--force")
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--socket={d}/munge.sock"))
            .arg(format!("--pid-file={d}/munged.pid"))
            .arg(format!("--log-file={d}/log/munged.log"))
            .arg(format!("--seed-file={d}/munge.seed"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !dir.join("munge.sock").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "munged did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            conf,
            bin,
            sbatch_log,
            munged: Some(munged),
            ctld: None,
            slurmd: None,
        };
        *RUNNING.lock().unwrap() = Some(dir.to_path_buf());
        c.start_controller(true);
        c.start_node();
        c.wait_idle();
        c
    }

    fn daemon(&self, program: &str, args: &[&str], log: &str) -> Child {
        let out = std::fs::File::create(self.dir.join("log").join(log)).unwrap();
        let mut c = Command::new(program);
        c.args(args)
            .env("SLURM_CONF", &self.conf)
            .stdout(Stdio::null())
            .stderr(out);
        die_with_test(&mut c);
        c.spawn().unwrap()
    }

    /// Starts `slurmctld` (`fresh`: without the state of an earlier one).
    pub fn start_controller(&mut self, fresh: bool) {
        assert!(self.ctld.is_none(), "the controller runs");
        let args: &[&str] = if fresh {
            &["-D", "-i", "-c"]
        } else {
            &["-D", "-i"]
        };
        self.ctld = Some(self.daemon("/usr/sbin/slurmctld", args, "slurmctld.out"));
        let t0 = Instant::now();
        while !self.answers() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "slurmctld did not start: {}",
                std::fs::read_to_string(self.dir.join("log/slurmctld.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops `slurmctld` (SIGTERM, by its PID: it saves its state, as a controller that is
    /// shut down or restarted does; after a SIGKILL, Slurm 22.05 can hand out job ids again and
    /// drains the node over the duplicates).
    pub fn stop_controller(&mut self) {
        if let Some(mut c) = self.ctld.take() {
            // SAFETY: a signal to the controller this cluster started and has not reaped.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    pub fn start_node(&mut self) {
        assert!(self.slurmd.is_none(), "slurmd runs");
        self.slurmd = Some(self.daemon("/usr/sbin/slurmd", &["-D"], "slurmd.out"));
    }

    /// Kills `slurmd` (SIGKILL, by its PID): the node is lost while its tasks run on.
    pub fn kill_node(&mut self) {
        if let Some(mut c) = self.slurmd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills (SIGKILL) the `slurmstepd` processes of this cluster, which watch over its tasks
    /// and report their ends: with [`Cluster::kill_node`], the node is cut off from the
    /// controller while the tasks' own processes go on as orphans.
    pub fn kill_node_processes(&self) -> usize {
        let conf = format!("SLURM_CONF={}", self.conf.display());
        let mut killed = 0;
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !cmd.starts_with(b"slurmstepd") {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if env.split(|b| *b == 0).any(|kv| kv == conf.as_bytes()) {
                // SAFETY: a signal to a step daemon of this test's cluster.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                killed += 1;
            }
        }
        killed
    }

    /// The node's state and allocated CPUs, as the controller sees them.
    pub fn node_state(&self) -> (String, u32) {
        let o = self
            .client("scontrol")
            .args(["-o", "show", "node"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or("")
                .to_string()
        };
        (
            field("State="),
            field("CPUAlloc=").parse().unwrap_or(u32::MAX),
        )
    }

    /// Whether the controller answers.
    pub fn answers(&self) -> bool {
        self.client("scontrol")
            .arg("ping")
            .output()
            .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("UP"))
            .unwrap_or(false)
    }

    /// Waits until the node is idle (no task of an earlier scenario left) with none of its
    /// CPUs allocated.
    pub fn wait_idle(&self) {
        let t0 = Instant::now();
        let mut empty_since: Option<Instant> = None;
        let mut reconfigured = 0;
        loop {
            let o = self
                .client("sinfo")
                .args(["--noheader", "--format=%T"])
                .output()
                .unwrap();
            let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            // `sinfo` can say `idle` while the node still counts CPUs as allocated.
            let (state, allocated) = self.node_state();
            if s == "idle" && state == "IDLE" && allocated == 0 {
                return;
            }
            // Slurm 22.05 can leave a lost or requeued task's CPUs allocated on a node that
            // runs nothing (the node stays `mixed`, or `IDLE` with CPUs allocated, with an
            // empty queue), and the next array would wait for `Resources` for ever.
            // `scontrol reconfigure` recounts them, as an operator would; it is asked once the
            // queue has been empty for 3 s, and again every 10 s.
            let q = self
                .client("squeue")
                .args([
                    "--noheader",
                    "--states=PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED",
                ])
                .output()
                .unwrap();
            if q.status.success() && q.stdout.iter().all(u8::is_ascii_whitespace) {
                let since = *empty_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(3 + 10 * reconfigured) {
                    self.scontrol(&["reconfigure"]);
                    reconfigured += 1;
                }
            } else {
                empty_since = None;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the Slurm node is `{s}` ({state}, {allocated} CPUs allocated), not idle{}",
                diagnosis()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A client command (`squeue`, `scontrol`, ...) for this cluster (not counted).
    pub fn client(&self, program: &str) -> Command {
        let mut c = Command::new(Path::new("/usr/bin").join(program));
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// Gives `cmd` this cluster (`SLURM_CONF`) and the counting `sbatch` and `squeue` first on
    /// its PATH.
    pub fn env(&self, cmd: &mut Command) {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("SLURM_CONF", &self.conf)
            .env("PATH", format!("{}:{path}", self.bin.display()));
    }

    /// `scontrol ARGS`, which must succeed.
    pub fn scontrol(&self, args: &[&str]) {
        let o = self.client("scontrol").args(args).output().unwrap();
        assert!(
            o.status.success(),
            "scontrol {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// The `sbatch` calls so far that submitted (not `--test-only`).
    pub fn submissions(&self) -> Vec<String> {
        std::fs::read_to_string(&self.sbatch_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("--test-only"))
            .map(str::to_string)
            .collect()
    }

    /// How many times the prepared commands read the queue.
    pub fn queue_reads(&self) -> usize {
        std::fs::read_to_string(self.dir.join("squeue.log"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// Cancels every job (between scenarios).
    pub fn cancel_all(&self) {
        let _ = self.client("scancel").arg("--user=root").output();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(mut g) = RUNNING.lock() {
            *g = None;
        }
        if self.ctld.is_some() {
            self.cancel_all();
            // Give the node a moment to end the cancelled tasks' processes.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                let o = self.client("squeue").arg("--noheader").output();
                if o.map(|o| o.stdout.is_empty()).unwrap_or(true) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for c in [&mut self.slurmd, &mut self.ctld, &mut self.munged] {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

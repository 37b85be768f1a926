//! The README's first code block, run as written: the first command a new user types must work
//! from a clone, and so must every command the demo tells them to try next.
//!
//! The commands are parsed out of README.md, never copied here, so a README edit that breaks the
//! first look fails this test. The second command of the block (the test suite) is what
//! `.ci/run` executes, parsed the same way there.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The command lines of README.md's first fenced code block (comments kept: bash ignores them).
fn first_code_block(readme: &str) -> Vec<String> {
    let mut lines = readme.lines();
    lines
        .by_ref()
        .find(|l| l.trim_start().starts_with("```"))
        .expect("README.md has no code block");
    lines
        .take_while(|l| !l.trim_start().starts_with("```"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// `line` to run through bash in `dir`, as a user at a prompt types it, output captured.
fn bash(line: &str, dir: &Path) -> Command {
    let mut command = Command::new("bash");
    command
        .args(["-c", line])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A shell line run through bash in the repository, as a user at a prompt would; its own
/// process group, so that it can be interrupted like Ctrl-C interrupts a terminal's job.
struct Job {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Job {
    fn start(line: &str, dir: &Path) -> Job {
        let mut child = bash(line, dir)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {line:?}: {e}"));
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        // stderr carries cargo's build output; keep it for the failure message.
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("[stderr] {l}"));
            }
        });
        Job {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads output until a line satisfies `pred`; panics with everything seen after `within`.
    fn wait_for(&mut self, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {what} within {within:?}; output:\n{}", self.output())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "the command ended before {what}; output:\n{}",
                        self.output()
                    )
                }
            }
        }
    }

    fn output(&self) -> String {
        self.seen.join("\n")
    }

    /// Sends `signal` to the job's process group (`kill -SIG -PGID`, as a terminal does).
    fn signal_group(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([
                &format!("-{signal}"),
                "--",
                &format!("-{}", self.child.id()),
            ])
            .status();
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal_group("KILL");
            let _ = self.child.wait();
        }
    }
}

/// Runs one line to completion through bash in `dir`: (success, stdout + stderr).
fn run_line(line: &str, dir: &Path) -> (bool, String) {
    let mut child = bash(line, dir)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {line:?}: {e}"));
    let mut err = String::new();
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let _ = stderr.read_to_string(&mut err);
        err
    });
    let mut out = String::new();
    let _ = child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out);
    let status = child.wait().expect("wait");
    let err = reader.join().unwrap_or_default();
    (status.success(), format!("{out}{err}"))
}

#[test]
fn readme_first_block_has_the_demo_then_the_test_suite() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let block = first_code_block(&readme);
    assert_eq!(block.len(), 2, "two commands expected, got {block:?}");
    assert!(
        block[0].contains(" demo"),
        "first: the demo, got {:?}",
        block[0]
    );
    assert!(
        block[1].contains("test"),
        "second: the test suite, got {:?}",
        block[1]
    );
    // .ci/run takes its test command from the same place.
    let ci = std::fs::read_to_string(repo().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.contains("README.md"),
        ".ci/run does not read its test command from README.md:\n{ci}"
    );
}

/// The demo, as the README says to run it; then the `add-broker` and `status` commands it prints,
/// as it prints them; the added broker must then take part in the sample traffic both ways;
/// Ctrl-C ends it cleanly.
#[test]
fn readme_demo_command_and_its_hints_work_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let demo_line = first_code_block(&readme)
        .into_iter()
        .next()
        .expect("a first command");
    let mut demo = Job::start(&demo_line, &repo());
    // A fresh clone builds the release binary first: minutes on a 2-core machine.
    demo.wait_for("demo banner", Duration::from_secs(1200), |l| {
        l.contains("meshbridge demo")
    });
    let add = demo
        .wait_for("add-broker hint", Duration::from_secs(60), |l| {
            l.contains(" add-broker ")
        })
        .trim()
        .to_string();
    let status = demo
        .wait_for("status hint", Duration::from_secs(60), |l| {
            l.contains(" status ")
        })
        .trim()
        .to_string();
    for _ in 0..3 {
        demo.wait_for(
            "a replicated sample message",
            Duration::from_secs(30),
            |l| l.contains("arrived on"),
        );
    }

    let (ok, out) = run_line(&add, &repo());
    assert!(ok, "{add}\nfailed:\n{out}");
    assert!(out.contains("added b4"), "{add}\n{out}");
    let (ok, out) = run_line(&status, &repo());
    assert!(ok, "{status}\nfailed:\n{out}");
    for b in ["b1", "b2", "b3", "b4"] {
        assert!(
            out.lines().any(|l| l.split_whitespace().next() == Some(b)),
            "{status} does not list {b}:\n{out}"
        );
    }

    // b4 takes part: it receives what the others publish and what it publishes reaches them.
    demo.wait_for("b4 joining", Duration::from_secs(30), |l| {
        l.contains("b4 joined the mesh")
    });
    demo.wait_for("an arrival on b4", Duration::from_secs(30), |l| {
        l.contains("arrived on") && l.contains("b4 (")
    });
    demo.wait_for(
        "a message from b4 arriving everywhere",
        Duration::from_secs(30),
        |l| {
            l.contains("from b4 arrived on")
                && ["b1 (", "b2 (", "b3 ("].iter().all(|b| l.contains(b))
        },
    );

    // Ctrl-C: the demo prints its summary and exits 0.
    demo.signal_group("INT");
    let summary = demo.wait_for("the summary", Duration::from_secs(30), |l| {
        l.contains("sample messages published")
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = demo.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not exit after Ctrl-C:\n{}",
            demo.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "demo exit {status}:\n{}", demo.output());
    let published: usize = summary
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("summary: {summary}"));
    assert!(published >= 6, "{summary}");
}

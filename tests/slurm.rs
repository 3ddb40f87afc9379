//! `moescope sweep --slurm` for real: submit the job array to a Slurm cluster
//! (`.ci/run` starts a single-node one on localhost with scripts/slurm_local.sh),
//! wait for it, collect, and compare with the same sweep run locally.
//! Skipped, with the reason printed, where no Slurm cluster answers.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn slurm_up() -> Result<(), String> {
    match Command::new("sinfo").args(["-h", "-o", "%T"]).output() {
        Err(e) => Err(format!(
            "sinfo not found ({e}): install slurm-wlm and run scripts/slurm_local.sh start"
        )),
        Ok(o) if !o.status.success() => Err(format!(
            "sinfo failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(o) => {
            let s = String::from_utf8_lossy(&o.stdout);
            if s.lines()
                .any(|l| ["idle", "mixed", "allocated"].contains(&l.trim()))
            {
                Ok(())
            } else {
                Err(format!("no usable Slurm node (sinfo says: {})", s.trim()))
            }
        }
    }
}

fn spec(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("sweep.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"slurm\"\npreset = \"tiny\"\n[set]\n\"train.max_steps\" = 4\n\"train.eval_tokens\" = 256\n\"train.batch_size\" = 2\n\
             \"measure.tokens\" = 128\n\"model.n_layer\" = 1\n\"model.d_model\" = 32\n\"model.d_ff\" = 32\n\"model.n_experts\" = 4\n\
             \"model.seq_len\" = 32\n\"data.builtin_bytes\" = 40000\n\"data.cache_dir\" = {:?}\n[grid]\n\"reg.orth_lambda\" = [0.0, 0.1]\n",
            dir.join("cache").display().to_string()
        ),
    )
    .unwrap();
    p
}

fn rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn slurm_job_array_gives_the_same_table_as_a_local_run() {
    if let Err(reason) = slurm_up() {
        println!("SKIPPED slurm_job_array_gives_the_same_table_as_a_local_run: {reason}");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let spec = spec(d.path());
    let out = d.path().join("slurm-out");
    let o = common::sweep(&spec, &out, &["--slurm", "--threads", "1"]);
    let script = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let sub = Command::new("sbatch")
        .args(["--parsable", &script])
        .output()
        .unwrap();
    assert!(
        sub.status.success(),
        "sbatch: {}",
        String::from_utf8_lossy(&sub.stderr)
    );
    let job = String::from_utf8_lossy(&sub.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let t0 = Instant::now();
    loop {
        let q = Command::new("squeue")
            .args(["-h", "-j", &job])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "Slurm job {job} did not finish"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    common::sweep(&spec, &out, &["--collect"]);

    let local = d.path().join("local-out");
    common::sweep(&spec, &local, &["--threads", "1"]);
    let (a, b) = (rows(&out), rows(&local));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["status"], "done", "{x}");
        for k in [
            "id",
            "lambda",
            "seed",
            "steps",
            "val_loss",
            "weight_mso",
            "act_mso",
        ] {
            assert_eq!(x[k], y[k], "{k} differs between Slurm and local runs");
        }
    }
    let ha = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let hb = std::fs::read_to_string(local.join("results.csv")).unwrap();
    assert_eq!(ha.lines().next(), hb.lines().next(), "different columns");
}

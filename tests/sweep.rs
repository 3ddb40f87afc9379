//! Sweeps end to end: parallel workers, a kill midway and a resumed rerun that
//! redoes nothing finished, a failing cell recorded as failed, the report.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn write_spec(dir: &Path, cache: &Path, grid: &str, steps: usize) -> std::path::PathBuf {
    let p = dir.join("sweep.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"test\"\npreset = \"tiny\"\n[set]\n\"train.max_steps\" = {steps}\n\"train.checkpoint_every\" = 4\n\"train.eval_every\" = 0\n\
             \"train.eval_tokens\" = 512\n\"train.batch_size\" = 4\n\"measure.tokens\" = 256\n\
             \"model.n_layer\" = 2\n\"model.d_model\" = 32\n\"model.d_ff\" = 64\n\"model.n_experts\" = 4\n\"model.seq_len\" = 32\n\
             \"data.builtin_bytes\" = 60000\n\"data.cache_dir\" = {:?}\n[grid]\n{grid}\n",
            cache.display().to_string()
        ),
    )
    .unwrap();
    p
}

fn status(run: &Path) -> String {
    std::fs::read_to_string(run.join("status.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["status"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn killed_sweep_resumes_without_redoing_finished_runs_and_reports() {
    let d = tempfile::tempdir().unwrap();
    let spec = write_spec(
        d.path(),
        &d.path().join("cache"),
        "\"reg.orth_lambda\" = [0.0, 0.1]\n\"train.seed\" = [0, 1]",
        40,
    );
    let out = d.path().join("out");
    let args = [
        "sweep",
        spec.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--jobs",
        "1",
        "--threads",
        "1",
    ];
    let mut child = Command::new(common::bin())
        .args(args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until one run has finished, then kill the sweep (its worker dies with it).
    let t0 = Instant::now();
    let finished = loop {
        let runs: Vec<_> = std::fs::read_dir(out.join("runs"))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if let Some(r) = runs.iter().find(|r| status(r) == "done") {
            break r.clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "no run finished");
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let stamp = std::fs::metadata(finished.join("summary.json"))
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let o = Command::new(common::bin()).args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already finished"), "{err}");
    assert_eq!(
        std::fs::metadata(finished.join("summary.json"))
            .unwrap()
            .modified()
            .unwrap(),
        stamp,
        "a finished run was redone"
    );
    let runs: Vec<_> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(runs.len(), 4);
    assert!(runs.iter().all(|r| status(r) == "done"));

    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .starts_with("id,status,error,dataset,method,lambda,seed"));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for t in [
        "Table 1",
        "Table 2",
        "Table 3",
        "Table 4",
        "Figure 1a",
        "Figure 1b",
        "Pearson r",
    ] {
        assert!(md.contains(t), "report.md lacks {t}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("Table 4") && html.contains("runs/"));
    // A third run finds everything done.
    let o = Command::new(common::bin()).args(args).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("4 done (4 already finished)"));
}

#[test]
fn failing_cell_is_recorded_and_the_others_complete() {
    let d = tempfile::tempdir().unwrap();
    let spec = write_spec(
        d.path(),
        &d.path().join("cache"),
        "\"train.lr\" = [0.001, -1.0]",
        3,
    );
    let out = d.path().join("out");
    let o = Command::new(common::bin())
        .args([
            "sweep",
            spec.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    // The report is written, and the exit status says that a run failed (issue 16).
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("1 failed") && e.contains("1 of 2 runs failed"),
        "{e}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let bad = rows.iter().find(|r| r["train.lr"] == -1.0).unwrap();
    assert_eq!(bad["status"], "failed");
    assert!(bad["error"].as_str().unwrap().contains("train.lr"));
    let good = rows.iter().find(|r| r["train.lr"] == 0.001).unwrap();
    assert_eq!(good["status"], "done");
    assert!(good["val_ppl"].as_f64().unwrap() > 1.0);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| failed |") && md.contains("train.lr"), "{md}");
}

#[test]
fn slurm_script_runs_the_worker_command() {
    let d = tempfile::tempdir().unwrap();
    let spec = write_spec(
        d.path(),
        &d.path().join("cache"),
        "\"train.seed\" = [0, 1]",
        2,
    );
    let out = d.path().join("out");
    common::sweep(&spec, &out, &["--slurm"]);
    let script = std::fs::read_to_string(out.join("slurm/sweep.sbatch")).unwrap();
    assert!(
        script.contains("#SBATCH --array=0-1") && script.contains("--run-one $SLURM_ARRAY_TASK_ID")
    );
    // Run the array tasks by hand, exactly as Slurm would, then collect.
    let line = script.lines().find(|l| l.starts_with("exec ")).unwrap();
    for task in ["0", "1"] {
        let cmd = line
            .trim_start_matches("exec ")
            .replace("$SLURM_ARRAY_TASK_ID", task);
        let o = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    common::sweep(&spec, &out, &["--collect"]);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(
        csv.lines().filter(|l| l.contains(",done,")).count(),
        2,
        "{csv}"
    );
}

/// `--device cuda` reaches every run's config, and the Slurm script then
/// asks for one GPU per array task (writing the script needs no GPU).
#[test]
fn slurm_script_on_cuda_requests_a_gpu_per_task() {
    let d = tempfile::tempdir().unwrap();
    let spec = write_spec(
        d.path(),
        &d.path().join("cache"),
        "\"train.seed\" = [0, 1]",
        2,
    );
    let (cpu, gpu) = (d.path().join("cpu"), d.path().join("gpu"));
    common::sweep(&spec, &cpu, &["--slurm"]);
    common::sweep(&spec, &gpu, &["--slurm", "--device", "cuda"]);
    let read = |p: &std::path::Path| std::fs::read_to_string(p.join("slurm/sweep.sbatch")).unwrap();
    assert!(!read(&cpu).contains("--gres"));
    let script = read(&gpu);
    assert!(script.contains("#SBATCH --gres=gpu:1\n"), "{script}");
    // A few CPUs per GPU task, not the login node's count.
    let cpus: usize = script
        .lines()
        .find_map(|l| l.strip_prefix("#SBATCH --cpus-per-task="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=8).contains(&cpus), "{script}");
    let kept = std::fs::read_to_string(gpu.join("sweep.toml")).unwrap();
    assert!(kept.contains("cuda"), "{kept}");
}

#[test]
fn routing_sweep_runs_into_the_report_routing_section() {
    let d = tempfile::tempdir().unwrap();
    let spec = d.path().join("routing.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"routing\"\npreset = \"tiny\"\n[set]\n\"train.max_steps\" = 4\n\"train.eval_tokens\" = 256\n\"train.batch_size\" = 4\n\
             \"measure.tokens\" = 128\n\"measure.final_analysis\" = true\n\"measure.analysis_tokens\" = 256\n\"measure.subspace\" = \"3\"\n\
             \"model.n_layer\" = 2\n\"model.d_model\" = 16\n\"model.d_ff\" = 24\n\"model.n_experts\" = 4\n\"model.n_head\" = 2\n\"model.seq_len\" = 32\n\
             \"data.builtin_bytes\" = 40000\n\"data.cache_dir\" = {:?}\n[grid]\n\
             \"model\" = [{{ routing = \"topk\", top_k = 1 }}, {{ routing = \"topk\", top_k = 2 }}, {{ routing = \"soft\" }}, {{ routing = \"soft\", router_temperature = 0.5 }}]\n",
            d.path().join("cache").display().to_string()
        ),
    )
    .unwrap();
    let out = d.path().join("out");
    let o = Command::new(common::bin())
        .args([
            "sweep",
            spec.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let runs: Vec<_> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(runs.len(), 4);
    for r in &runs {
        let a: serde_json::Value =
            serde_json::from_slice(&std::fs::read(r.join("analysis.json")).unwrap()).unwrap();
        assert!(
            a["layers"][0]["subspace"]["overlap"].is_array(),
            "{}",
            r.display()
        );
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    // Each measure side by side per routing mode, under the three pair sets.
    for title in [
        "Routing: perplexity and activation MSO by pair set",
        "Routing: Jacobian alignment (function space) by pair set, with nulls",
        "Routing: expert subspaces (representation space) by pair set, with nulls",
    ] {
        assert!(md.contains(title), "{md}");
    }
    assert!(
        md.contains("gate_weighted") && md.contains("permutation null"),
        "{md}"
    );
    for mode in ["| top-1", "| top-2", "| soft", "| soft (T = 0.5)"] {
        assert!(md.contains(mode), "routing table lacks {mode}");
    }
    assert!(md.contains("routing-scatter.svg") && md.contains("routing-soft-jacobian-l0.svg"));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Functional (Jacobian) vs representational"));
}

/// The regulariser zoo as a sweep: every method runs, results.csv names it,
/// and the report compares them against `none` (and keeps Tables 1–4 to the
/// λ study).
#[test]
fn regulariser_sweep_reaches_the_report() {
    let d = tempfile::tempdir().unwrap();
    let spec = write_spec(
        d.path(),
        &d.path().join("cache"),
        "\"reg\" = [{}, { orth_lambda = 0.01 }, { act_lambda = 0.1 }, { grad_lambda = 0.1 }, { contrastive_lambda = 0.05 }, { aux_lambda = 0.01 }, { loss_free_gamma = 0.001 }]\n\"train.seed\" = [0, 1]",
        8,
    );
    let out = d.path().join("out");
    common::sweep(&spec, &out, &["--jobs", "2", "--threads", "1"]);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let mut rdr = csv::Reader::from_reader(csv.as_bytes());
    let header = rdr.headers().unwrap().clone();
    let mi = header.iter().position(|h| h == "method").unwrap();
    let si = header.iter().position(|h| h == "status").unwrap();
    let mut methods: Vec<String> = Vec::new();
    for rec in rdr.records() {
        let rec = rec.unwrap();
        assert_eq!(&rec[si], "done", "{rec:?}");
        methods.push(rec[mi].to_string());
    }
    methods.sort();
    methods.dedup();
    assert_eq!(
        methods,
        [
            "act 0.1",
            "aux 0.01",
            "contrastive 0.05",
            "grad 0.1",
            "loss-free 0.001",
            "none",
            "orth 0.01"
        ]
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Regularisers and load balancing"), "{md}");
    for m in &methods {
        assert!(
            md.contains(&format!("| {m} |")),
            "{m} missing from the report"
        );
    }
    assert!(md.contains("paired t"), "{md}");
    // Tables 1–4 only hold the λ study (none and orth).
    let t1 = md
        .split("Table 1")
        .nth(1)
        .unwrap()
        .split("Table 2")
        .next()
        .unwrap();
    assert_eq!(t1.matches("\n| 0").count(), 2, "{t1}");
}

//! The `moescope` command line: the commands and their dispatch. Each
//! command's flags and its handling live in `cli/<command>.rs`; the work is
//! done by the library.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "moescope",
    version,
    about = "Train Mixture-of-Experts language models and measure the geometry of their experts.",
    long_about = "Train Mixture-of-Experts language models and measure the geometry of their experts.\n\n\
Quick start (built-in synthetic corpus, about a minute on 2 cores):\n  moescope train --preset tiny --out runs/tiny"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a NanoGPT-MoE language model.
    Train(cli::train::TrainArgs),
    /// Evaluate a trained model: loss and perplexity on a split.
    Eval(cli::eval::EvalArgs),
    /// Sample text from a trained model.
    Generate(cli::generate::GenerateArgs),
    /// Every expert-geometry measure (docs/MEASURES.md) on a checkpoint, as JSON (schema moescope.analysis/1).
    Analyze(cli::analyze::AnalyzeArgs),
    /// Run a sweep: the product of listed values over config keys, in parallel worker processes; resumable.
    Sweep(cli::sweep::SweepArgs),
    /// Write report.md and report.html (tables, SVG figures) for a sweep folder.
    Report(cli::sweep::ReportArgs),
    /// The weight-vs-activation study as a preset sweep, then its report.
    Reproduce(cli::sweep::ReproduceArgs),
    /// Benchmarks: training step, evaluation, Jacobians, HF streaming (peer comparison: docs/SPEED.md).
    Bench {
        #[command(subcommand)]
        what: cli::bench::BenchCmd,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Train(a) => cli::train::run(a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Generate(a) => cli::generate::run(a),
        Cmd::Analyze(a) => cli::analyze::run(a),
        Cmd::Sweep(a) => cli::sweep::run(a),
        Cmd::Report(a) => cli::sweep::report(a),
        Cmd::Reproduce(a) => cli::sweep::reproduce(a),
        Cmd::Bench { what } => cli::bench::run(what),
    }
}

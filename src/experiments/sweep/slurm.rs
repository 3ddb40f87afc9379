//! Running a sweep as a Slurm job array.

use super::folder::SweepDir;
use super::local::worker_command;
use super::{Cell, SweepSpec};
use crate::fsutil::write_atomic;
use crate::{Error, Result};
use std::path::PathBuf;

/// Write a Slurm job-array script running the same worker command per cell.
pub fn write_slurm(
    dir: &SweepDir,
    spec: &SweepSpec,
    cells: &[Cell],
    threads: usize,
) -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Other(format!("cannot find the moescope executable: {e}")))?;
    let dir_abs = SweepDir(std::fs::canonicalize(&dir.0).map_err(|e| Error::io(&dir.0, e))?);
    let cmd = worker_command(&exe, &dir_abs, "$SLURM_ARRAY_TASK_ID", threads);
    let slurm = dir_abs.0.join("slurm");
    std::fs::create_dir_all(&slurm).map_err(|e| Error::io(&slurm, e))?;
    let script = format!(
        "#!/bin/bash\n\
         # moescope sweep `{name}`: one array task per run ({n} runs).\n\
         # Submit: sbatch {path}\n\
         # Then:   moescope sweep {spec} --out {dir} --collect\n\
         #SBATCH --job-name=moescope-{name}\n\
         #SBATCH --array=0-{last}\n\
         #SBATCH --cpus-per-task={threads}\n\
         {gres}\
         #SBATCH --output={slurm}/%A_%a.out\n\
         set -euo pipefail\n\
         exec {cmd}\n",
        name = spec.name,
        n = cells.len(),
        path = slurm.join("sweep.sbatch").display(),
        spec = dir_abs.spec().display(),
        dir = dir_abs.0.display(),
        last = cells.len().saturating_sub(1),
        gres = if super::uses_gpu(cells) {
            "#SBATCH --gres=gpu:1\n"
        } else {
            ""
        },
        slurm = slurm.display(),
        cmd = cmd.join(" "),
    );
    let path = slurm.join("sweep.sbatch");
    write_atomic(&path, script.as_bytes())?;
    Ok(path)
}

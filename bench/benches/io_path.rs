//! `cargo bench -p dioxide-hostbench`: the host benchmark of the 4K read path,
//! then the same on 1 and N threads side by side (N: this machine's
//! parallelism, at most 8).

#[global_allocator]
static A: dioxide_hostbench::CountingAlloc = dioxide_hostbench::CountingAlloc;

fn main() {
    let targets = ["raw", "generic", "simple"];
    let mut report =
        dioxide_hostbench::run_targets(2_000_000, 32, &targets).unwrap_or_else(|e| panic!("{e}"));
    for t in dioxide_hostbench::parse_threads("auto").unwrap_or_else(|e| panic!("{e}")) {
        let rows = dioxide_hostbench::run_threads(2_000_000, 32, &targets, t)
            .unwrap_or_else(|e| panic!("{e}"));
        report.threads_rows.extend(rows);
    }
    print!("{}", report.table());
}

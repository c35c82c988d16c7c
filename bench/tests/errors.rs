//! The host benchmark reports figures only for reads that were done: a read
//! the controller fails makes the run fail, in every build.
//!
//! Threads side by side report for every target, each its own reads and
//! allocations.

#[global_allocator]
static A: dioxide_hostbench::CountingAlloc = dioxide_hostbench::CountingAlloc;

/// Unrecovered Read Error (SCT 2, SC 0x81), Do Not Retry.
const READ_ERROR: u16 = (1 << 14) | (2 << 8) | 0x81;

#[test]
fn failed_reads_fail_the_benchmark_and_a_clean_run_reports_every_target() {
    let r = dioxide_hostbench::run(2000, 8).expect("clean run");
    let targets: Vec<&str> = r.rows.iter().map(|r| r.target).collect();
    assert_eq!(targets, ["raw", "generic", "simple"]);
    let allocs = |t: &str| r.rows.iter().find(|r| r.target == t).unwrap().allocs_per_io;
    assert_eq!(allocs("simple"), 0.0, "{:?}", r.rows);
    assert_eq!(allocs("raw"), 0.0, "{:?}", r.rows);
    assert!(allocs("generic") >= 1.0, "{:?}", r.rows);
    // Each row was served by the path it is named after (2000 reads each).
    for row in &r.rows {
        let want = match row.target {
            "simple" => (2000, 0),
            "generic" => (0, 2000),
            _ => (0, 0),
        };
        assert_eq!(
            (row.simple_path, row.generic_path, row.fell_back),
            (want.0, want.1, 0),
            "{row:?}"
        );
    }
    for target in ["raw", "generic", "simple"] {
        let e = dioxide_hostbench::run_with_status(2000, 8, &[target], READ_ERROR)
            .expect_err("reads failed, yet the benchmark passed");
        assert!(
            e.contains(&format!("target {target}: 200 of 200 reads failed")),
            "{e}"
        );
        assert!(e.contains("I/O error"), "{e}");
    }
}

#[test]
fn threads_side_by_side_each_report_their_own_reads_and_allocations() {
    let rows = dioxide_hostbench::run_threads(2000, 8, &["raw", "generic", "simple"], 2)
        .expect("clean run");
    let targets: Vec<(usize, &str)> = rows.iter().map(|r| (r.threads, r.target)).collect();
    assert_eq!(targets, [(2, "raw"), (2, "generic"), (2, "simple")]);
    for r in &rows {
        // Per thread: a count shared by the threads would show 2 per read.
        let want = if r.target == "generic" { 1.0 } else { 0.0 };
        assert_eq!(r.allocs_per_io, want, "{r:?}");
        assert!(r.iops > 0.0 && r.iops_per_thread > 0.0, "{r:?}");
        assert!(r.cpu_cycles_per_io <= r.cpu_cycles_per_io_max, "{r:?}");
        assert!(r.json().starts_with(&format!(
            "{{\"threads\":2,\"target\":\"{}\",\"cpu_cycles_per_io\":",
            r.target
        )));
    }
    // Failed reads fail the run (after every thread finished).
    let e = dioxide_hostbench::run_threads_with_status(2000, 8, &["raw", "simple"], 2, READ_ERROR)
        .expect_err("reads failed, yet the benchmark passed");
    assert!(e.contains("target raw: 200 of 200 reads failed"), "{e}");
    let one = dioxide_hostbench::run_threads(2000, 8, &["raw"], 0).expect("clean run");
    assert_eq!(one[0].threads, 1, "0 threads is one");
}

#[test]
fn thread_lists() {
    assert_eq!(dioxide_hostbench::parse_threads("1,2,4"), Ok(vec![1, 2, 4]));
    let auto = dioxide_hostbench::parse_threads("auto").unwrap();
    assert_eq!(auto[0], 1);
    assert!(auto.len() <= 2 && auto.iter().all(|&t| (1..=8).contains(&t)));
    for bad in ["0", "65", "x", "", "1,,2"] {
        assert_eq!(
            dioxide_hostbench::parse_threads(bad),
            Err(format!(
                "--threads {bad}: thread counts from 1 to 64, or auto"
            ))
        );
    }
}

/// The write rows: 4 KiB overwrites of the file's written blocks on the
/// simple path (every one of them, nothing allocated) beside raw writes.
#[test]
fn simple_writes_take_the_simple_path_and_allocate_nothing() {
    let r = dioxide_hostbench::run_targets(2000, 8, &["raw-write", "simple-write", "generic"])
        .expect("clean run");
    let row = |t: &str| r.rows.iter().find(|r| r.target == t).unwrap().clone();
    let w = row("simple-write");
    assert_eq!((w.simple_path, w.generic_path, w.fell_back), (2000, 0, 0));
    assert_eq!(w.allocs_per_io, 0.0);
    assert_eq!(row("raw-write").allocs_per_io, 0.0);
    // The control: the generic path's dio object is counted.
    assert!(row("generic").allocs_per_io >= 1.0);
}

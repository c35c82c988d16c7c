//! The host benchmark reports figures only for reads that were done: a read
//! the controller fails makes the run fail, in every build.
//!
//! One test function: the allocation counter is process-wide, and tests
//! running side by side would count each other's allocations.

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

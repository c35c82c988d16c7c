//! `dioxide-hostbench --nbd --threads`: the NBD request path on threads
//! side by side reports every thread count's rows, with every reply's data
//! checked and no allocation per request, beside a count that shows the
//! allocation counter counting. No timing is asserted.

#[global_allocator]
static A: dioxide_hostbench::CountingAlloc = dioxide_hostbench::CountingAlloc;

use serde_json::Value;

const IOS: u64 = 1_000;

#[test]
fn nbd_on_one_and_two_threads_reports_rows_for_each_count_with_no_allocation_per_request() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dioxide-hostbench"))
        .args(["--nbd", "--json", "--ios", &IOS.to_string()])
        .args([
            "--qd", "1,16", "--csum", "off", "--mtu", "1500", "--tso", "off",
        ])
        .args(["--threads", "1,2"])
        .output()
        .unwrap();
    // A reply with an error, short or with other data than the model's
    // (the loopback's client sums every reply) fails the run.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The single-thread rows are as without --threads.
    let single = json["host_rows"].as_array().unwrap();
    assert_eq!(single.len(), 6, "{json:#}");
    for r in single {
        assert_eq!(r["allocs_per_io"].as_f64(), Some(0.0), "{r}");
        assert!(r["setup_allocs"].as_u64().is_some_and(|n| n > 0), "{r}");
    }
    assert!(
        json["cpus_online"].as_u64().is_some_and(|n| n >= 1),
        "{json}"
    );
    let allowed = json["cpus_allowed"].as_array().unwrap().len();
    let rows = json["host_threads_rows"].as_array().unwrap();
    assert_eq!(rows.len(), 12, "{json:#}");
    for threads in [1u64, 2] {
        for target in ["file", "raw", "null"] {
            for qd in [1u64, 16] {
                let r = rows
                    .iter()
                    .find(|r| r["threads"] == threads && r["target"] == target && r["qd"] == qd)
                    .unwrap_or_else(|| panic!("{threads} threads, {target} qd {qd}: {json:#}"));
                assert_eq!(r["reads"].as_u64(), Some(IOS), "{r}");
                // Per request, on every thread (its own counter, client
                // included) ...
                assert_eq!(r["allocs_per_io"].as_f64(), Some(0.0), "{r}");
                // ... and the same counters counted each thread's set-up
                // (sockets, server, pools): they count.
                assert!(r["setup_allocs"].as_u64().is_some_and(|n| n > 0), "{r}");
                let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
                assert!(f("cycles_per_io") > 0.0, "{r}");
                assert!(f("cycles_per_io") <= f("cycles_per_io_max"), "{r}");
                assert!(f("cpu_cycles_per_io") <= f("cpu_cycles_per_io_max"), "{r}");
                assert!(f("iops") > 0.0, "{r}");
                assert!(f("iops_ratio") > 0.0, "{r}");
                // The threads' CPU time over the run's wall clock: at most
                // one CPU per thread.
                assert!(f("cpus_busy") > 0.0, "{r}");
                assert!(f("cpus_busy") <= threads as f64 + 0.01, "{r}");
                if threads == 1 {
                    assert_eq!(f("iops_ratio"), 1.0, "{r}");
                }
                // Pinned to a CPU each, when the affinity mask could be read.
                let cpus = r["cpus"].as_array().unwrap();
                if allowed > 0 {
                    assert_eq!(cpus.len() as u64, threads, "{r}");
                }
            }
        }
    }
}

#[test]
fn a_reply_whose_data_does_not_check_fails_the_threaded_run() {
    // The control of the data check above: expecting other bytes than the
    // model's zeros fails every read, on both threads, and the threads do
    // not wait for each other forever when one fails.
    let e = dioxide_hostbench::nbd::run_threads_checked(
        200,
        &["raw", "null"],
        &[4],
        &[dioxide_service::loopback::Link::default()],
        &[2],
        |_| 1,
    )
    .expect_err("every reply's data was wrong, yet the run passed");
    assert!(
        e.contains("2 threads: raw qd 4: 64 of 64 reads failed"),
        "{e}"
    );
    let rows = dioxide_hostbench::nbd::run_threads(
        200,
        &["null"],
        &[4],
        &[dioxide_service::loopback::Link::default()],
        &[2],
    )
    .expect("clean run");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].iops_ratio, None, "no 1-thread row to compare with");
}

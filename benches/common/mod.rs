//! What the step benches share (benches/*_step.sh run them beside diffusers): the process's CPU
//! time and the JSON line of a side's timings.

use std::time::Instant;

/// CPU time of the whole process, in seconds (`time.process_time()` on the Python side).
pub fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// `{"median_s", "min_s", "times_s"}` fields, the times in run order.
fn stats(prefix: &str, mut times: Vec<f64>) -> String {
    let all = times.iter().map(|t| format!("{t:.4}")).collect::<Vec<_>>().join(", ");
    times.sort_by(|a, b| a.total_cmp(b));
    format!("\"{prefix}median_s\": {:.4}, \"{prefix}min_s\": {:.4}, \"{prefix}times_s\": [{all}]", times[times.len() / 2], times[0])
}

/// One warm-up call of `run`, then `iters` timed ones; prints runner's JSON line (wall and CPU time).
pub fn time_forwards<T>(iters: usize, threads: i32, mut run: impl FnMut() -> T) {
    let _ = run();
    let (mut wall, mut cpu) = (vec![], vec![]);
    for _ in 0..iters {
        let (s, c) = (Instant::now(), process_cpu_s());
        let _ = run();
        wall.push(s.elapsed().as_secs_f64());
        cpu.push(process_cpu_s() - c);
    }
    println!("{{\"impl\": \"runner\", {}, {}, \"threads\": {threads}}}", stats("", wall), stats("cpu_", cpu));
}

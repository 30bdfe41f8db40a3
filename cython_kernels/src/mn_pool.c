/* Node-local thread pools: persistent pinned threads, GIL-free dispatch, a
 * spin-then-futex completion barrier, per-thread busy/wait counters. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "mn_internal.h"


#define CACHELINE 64

typedef struct {
    _Alignas(CACHELINE) int64_t tasks;
    int64_t busy_ns, wait_ns;
    char pad[CACHELINE - 24];
} thread_counters;

struct mn_pool {
    int n, caller0, n_threads;       /* n_threads: dedicated threads */
    int *cpus;
    pthread_t *threads;
    int64_t spin_ns;
    mn_task_fn fn; void *ctx;
    _Alignas(CACHELINE) _Atomic uint32_t gen;        /* bumped by submit (futex word) */
    _Atomic int sleepers;                            /* workers in futex wait on gen */
    _Alignas(CACHELINE) _Atomic int pending;         /* dedicated threads still running the task */
    _Atomic uint32_t done;                           /* = gen of the finished task (futex word) */
    _Atomic int waiter_sleeping;
    _Alignas(CACHELINE) _Atomic int bar_count;
    _Atomic uint32_t bar_gen;                        /* futex word */
    _Atomic int bar_sleepers;
    _Alignas(CACHELINE) _Atomic int stop;
    int in_flight;
    thread_counters *ctr;
};

static inline int64_t now_ns(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static void futex_wait(_Atomic uint32_t *addr, uint32_t val) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}
static void futex_wake(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

/* wait until *word != val: spin up to spin_ns, then sleep on the futex */
static void wait_change(_Atomic uint32_t *word, uint32_t val, _Atomic int *sleepers, int64_t spin_ns) {
    if (atomic_load_explicit(word, memory_order_acquire) != val) return;
    int64_t t0 = 0;
    for (unsigned it = 0;; it++) {
        for (int k = 0; k < 16; k++) {
            MN_CPU_RELAX();
            if (atomic_load_explicit(word, memory_order_acquire) != val) return;
        }
        if ((it & 7) == 0) {
            int64_t t = now_ns();
            if (!t0) t0 = t;
            else if (t - t0 >= spin_ns) break;
        }
    }
    for (;;) {
        atomic_fetch_add(sleepers, 1);
        if (atomic_load(word) == val) futex_wait(word, val);
        atomic_fetch_sub(sleepers, 1);
        if (atomic_load_explicit(word, memory_order_acquire) != val) return;
    }
}

typedef struct { mn_pool *pool; int ith; } worker_arg;

static void *worker_main(void *p) {
    worker_arg wa = *(worker_arg *)p;
    free(p);
    mn_pool *pool = wa.pool;
    thread_counters *c = &pool->ctr[wa.ith];
    uint32_t seen = 0;
    for (;;) {
        wait_change(&pool->gen, seen, &pool->sleepers, pool->spin_ns);
        seen = atomic_load_explicit(&pool->gen, memory_order_acquire);
        if (atomic_load(&pool->stop)) break;
        int64_t t0 = now_ns();
        pool->fn(pool->ctx, wa.ith, pool->n);
        c->busy_ns += now_ns() - t0;
        c->tasks++;
        if (atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel) == 1) {
            atomic_store_explicit(&pool->done, seen, memory_order_release);
            if (atomic_load(&pool->waiter_sleeping)) futex_wake(&pool->done);
        }
    }
    return NULL;
}

static int allowed_set(cpu_set_t *set) {
    CPU_ZERO(set);
    return sched_getaffinity(0, sizeof(*set), set);
}

static void describe_allowed(const cpu_set_t *set, char *buf, size_t len) {
    size_t o = 0; int first = 1;
    buf[0] = 0;
    for (int c = 0; c < CPU_SETSIZE && o + 16 < len; c++) {
        if (!CPU_ISSET(c, set)) continue;
        int e = c;
        while (e + 1 < CPU_SETSIZE && CPU_ISSET(e + 1, set)) e++;
        o += (size_t)snprintf(buf + o, len - o, first ? "%d" : ",%d", c);
        if (e > c) o += (size_t)snprintf(buf + o, len - o, "-%d", e);
        first = 0; c = e;
    }
}

int mn_check_cpus(const int *cpus, int n, char *err, size_t errlen) {
    if (n <= 0) { snprintf(err, errlen, "a CPU set needs at least one CPU"); return -1; }
    cpu_set_t set;
    if (allowed_set(&set) != 0) { snprintf(err, errlen, "sched_getaffinity failed: %s", strerror(errno)); return -1; }
    long ncfg = sysconf(_SC_NPROCESSORS_CONF);
    for (int i = 0; i < n; i++) {
        int c = cpus[i];
        if (c < 0 || c >= CPU_SETSIZE || !CPU_ISSET(c, &set)) {
            char al[256]; describe_allowed(&set, al, sizeof al);
            snprintf(err, errlen, "CPU %d %s (CPUs available to this process: %s)", c,
                     (c < 0 || c >= ncfg) ? "does not exist" : "is not available to this process", al);
            return -1;
        }
    }
    return 0;
}

mn_pool *mn_pool_create(const int *cpus, int n, int caller_is_worker0, char *err, size_t errlen) {
    if (mn_check_cpus(cpus, n, err, errlen)) return NULL;
    mn_pool *p = aligned_alloc(CACHELINE, (sizeof(mn_pool) + CACHELINE - 1) / CACHELINE * CACHELINE);
    if (!p) { snprintf(err, errlen, "out of memory"); return NULL; }
    memset(p, 0, sizeof *p);
    p->n = n; p->caller0 = caller_is_worker0 ? 1 : 0; p->n_threads = n - p->caller0;
    p->spin_ns = 100000;
    const char *env = getenv("MOE_NUMA_SPIN_US");
    if (env && *env) p->spin_ns = (int64_t)(atof(env) * 1000.0);
    p->cpus = malloc(sizeof(int) * n);
    p->threads = calloc(n, sizeof(pthread_t));
    p->ctr = aligned_alloc(CACHELINE, sizeof(thread_counters) * n);
    if (!p->cpus || !p->threads || !p->ctr) { snprintf(err, errlen, "out of memory"); goto fail; }
    memcpy(p->cpus, cpus, sizeof(int) * n);
    memset(p->ctr, 0, sizeof(thread_counters) * n);
    for (int i = p->caller0; i < n; i++) {
        pthread_attr_t attr; pthread_attr_init(&attr);
        cpu_set_t set; CPU_ZERO(&set); CPU_SET(cpus[i], &set);
        pthread_attr_setaffinity_np(&attr, sizeof set, &set);
        worker_arg *wa = malloc(sizeof *wa);
        wa->pool = p; wa->ith = i;
        int rc = wa ? pthread_create(&p->threads[i], &attr, worker_main, wa) : ENOMEM;
        pthread_attr_destroy(&attr);
        if (rc) {
            free(wa);
            snprintf(err, errlen, "cannot start a pool thread on CPU %d: %s", cpus[i], strerror(rc));
            atomic_store(&p->stop, 1);
            atomic_fetch_add(&p->gen, 1); futex_wake(&p->gen);
            for (int j = p->caller0; j < i; j++) pthread_join(p->threads[j], NULL);
            goto fail;
        }
    }
    return p;
fail:
    free(p->cpus); free(p->threads); free(p->ctr); free(p);
    return NULL;
}

int mn_pool_size(const mn_pool *p) { return p->n; }
void mn_pool_set_spin_ns(mn_pool *p, int64_t ns) { p->spin_ns = ns < 0 ? 0 : ns; }

void mn_pool_submit(mn_pool *p, mn_task_fn fn, void *ctx) {
    p->fn = fn; p->ctx = ctx; p->in_flight = 1;
    atomic_store_explicit(&p->pending, p->n_threads, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_seq_cst);
    if (p->n_threads > 0 && atomic_load(&p->sleepers) > 0) futex_wake(&p->gen);
}

void mn_pool_wait(mn_pool *p) {
    if (!p->in_flight) return;
    p->in_flight = 0;
    uint32_t g = atomic_load_explicit(&p->gen, memory_order_relaxed);
    if (p->caller0) {
        int64_t t0 = now_ns();
        p->fn(p->ctx, 0, p->n);
        p->ctr[0].busy_ns += now_ns() - t0;
        p->ctr[0].tasks++;
    }
    if (p->n_threads == 0) return;
    if (atomic_load_explicit(&p->done, memory_order_acquire) == g) return;
    int64_t t0 = now_ns();
    /* spin, then sleep until the last worker publishes done == g */
    int64_t tspin = 0;
    for (unsigned it = 0; atomic_load_explicit(&p->done, memory_order_acquire) != g; it++) {
        MN_CPU_RELAX();
        if ((it & 127) == 0) {
            int64_t t = now_ns();
            if (!tspin) tspin = t;
            else if (t - tspin >= p->spin_ns) {
                for (;;) {
                    uint32_t d = atomic_load(&p->done);
                    if (d == g) break;
                    atomic_store(&p->waiter_sleeping, 1);
                    if (atomic_load(&p->done) == d) futex_wait(&p->done, d);
                    atomic_store(&p->waiter_sleeping, 0);
                }
                break;
            }
        }
    }
    p->ctr[0].wait_ns += now_ns() - t0;
}

void mn_pool_run(mn_pool *p, mn_task_fn fn, void *ctx) { mn_pool_submit(p, fn, ctx); mn_pool_wait(p); }

void mn_pool_barrier(mn_pool *p, int ith) {
    if (!p || p->n <= 1) return;
    int64_t t0 = now_ns();
    uint32_t g = atomic_load_explicit(&p->bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->bar_count, 1, memory_order_acq_rel) == p->n - 1) {
        atomic_store_explicit(&p->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&p->bar_gen, 1, memory_order_seq_cst);
        if (atomic_load(&p->bar_sleepers) > 0) futex_wake(&p->bar_gen);
    } else {
        wait_change(&p->bar_gen, g, &p->bar_sleepers, p->spin_ns);
    }
    p->ctr[ith].wait_ns += now_ns() - t0;
}

void mn_pool_destroy(mn_pool *p) {
    if (!p) return;
    mn_pool_wait(p);
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->gen, 1);
    futex_wake(&p->gen);
    for (int i = p->caller0; i < p->n; i++) pthread_join(p->threads[i], NULL);
    free(p->cpus); free(p->threads); free(p->ctr); free(p);
}

int mn_pool_stats(const mn_pool *p, mn_thread_stats *out, int n) {
    for (int i = 0; i < n && i < p->n; i++) {
        out[i].tasks = p->ctr[i].tasks; out[i].busy_ns = p->ctr[i].busy_ns; out[i].wait_ns = p->ctr[i].wait_ns;
    }
    return p->n;
}

void mn_pool_reset_stats(mn_pool *p) { memset(p->ctr, 0, sizeof(thread_counters) * p->n); }

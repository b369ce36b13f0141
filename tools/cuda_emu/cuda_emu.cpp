// The emulator behind cuda_emu.h: fibers for CUDA threads, a scheduler that checks every
// collective, per-block shared memory, the few CUDA runtime calls the host code makes, and the
// controls the tests use (schedule, device size, coverage) as extern "C" functions for ctypes.
//
// Fibers are ucontext (glibc, no extra package): a switch costs ~0.16 us here, which is small
// next to the kernels' own work at emulation sizes; Boost.Context would switch faster but adds a
// Debian package to every CI run. Under AddressSanitizer the switches carry the sanitizer's
// fiber annotations, and stacks are 64 KB (ASan clears a fiber's stack shadow at each switch:
// large stacks make it slow).
#include "cuda_emu.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FASTNORM_EMU_ASAN 1
#else
#define FASTNORM_EMU_ASAN 0
#endif

namespace fastnorm_emu {
namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr int kMaxThreads = 1024;
constexpr size_t kSharedPerBlock = 48 * 1024;          // without the opt-in attribute
constexpr size_t kSharedPerBlockOptin = 227 * 1024;    // H100
constexpr size_t kSharedPerSm = 228 * 1024;

enum class Wait { kNone, kBarrier, kWarp, kExited };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // kStackBytes, a guard page below
  uint3 tid{0, 0, 0};
  int linear = 0, warp = 0, lane = 0;
  Wait wait = Wait::kNone;
  bool runnable = false;
  // the collective it waits at
  const char* file = nullptr;
  int line = 0;
  int kind = -1;  // -1: __syncwarp, else ShflMode
  unsigned mask = 0;
  int b = 0, width = 32;
  uint64_t value = 0, result = 0;
  void* fake_stack = nullptr;
};

struct Config {
  int thread_order = 0;  // 0 forward, 1 reverse, 2 seeded random (between scheduling points)
  int block_order = 0;   // 0 forward, 1 reverse
  uint64_t seed = 0;
  int sm_count = 132;
  int blocks_per_sm = 0;  // occupancy query answer; 0: from threads and shared memory
  bool record_only = false;  // plans: record each launch, run no block
};

struct State {
  std::recursive_mutex mu;
  Config cfg;
  std::vector<std::pair<int, int>> devices{{132, 0}};  // device ordinal -> (sm_count, blocks_per_sm)
  int device = 0;
  // the launch
  const void* kernel = nullptr;
  std::string kernel_name;
  bool entered = false;
  dim3 grid, block;
  size_t smem = 0;
  uint3 bidx{0, 0, 0};
  BlockBody body = nullptr;
  void* body_ctx = nullptr;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  ucontext_t sched;
  void* sched_fake = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  // shared memory of the block
  std::vector<std::pair<const void*, void*>> shared;
  size_t static_shared = 0;
  void* dyn = nullptr;
  // outcome
  bool failed = false;
  std::string error;
  std::map<const void*, int> optin;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  std::map<std::string, long> coverage;
  std::vector<std::string> recorded;  // record_only: "kernel<TAB>grid<TAB>block<TAB>smem"
  // The CUDA build's resources per kernel instantiation ("ns::name<args>": registers, static
  // shared memory, named barriers), loaded from build/kernel_resources.json by emu.py; empty:
  // occupancy queries answer from threads and shared memory alone.
  std::map<std::string, std::tuple<int, int, int>> resources;
  std::vector<std::string> occupancy_log;  // "kernel<TAB>threads<TAB>smem<TAB>blocks<TAB>source"
  std::atomic<uint64_t> occupancy_epoch{0};  // occupancy_epoch() of cuda_emu.h
  long launches = 0;
  std::mt19937_64 rng;
};

State& st() {
  static State* s = new State();  // never destroyed: fibers may outlive static destruction order
  return *s;
}

// ---- sanitizer fiber annotations ----------------------------------------------------------------
inline void start_switch(void** fake, const void* bottom, size_t size) {
#if FASTNORM_EMU_ASAN
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}
inline void finish_switch(void* fake, const void** bottom_old, size_t* size_old) {
#if FASTNORM_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, bottom_old, size_old);
#else
  (void)fake, (void)bottom_old, (void)size_old;
#endif
}

// ---- names ---------------------------------------------------------------------------------------
std::string symbol_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = status == 0 && d ? d : info.dli_sname;
    std::free(d);
    return s;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", fn);
  return buf;
}

// 'void fastnorm::channels::k<c10::Half, 8>(fastnorm::channels::ClFwd<c10::Half>)' ->
// 'fastnorm::channels::k<c10::Half, 8>': the name and template arguments, as emu.py keys the
// resource report (the parameter list is spelled differently by some demanglers).
std::string signature_head(const std::string& sig) {
  std::string t = sig;
  if (!t.empty() && t.back() == ')') {
    int depth = 0;
    for (size_t i = t.size(); i-- > 0;) {
      depth += t[i] == ')' ? 1 : t[i] == '(' ? -1 : 0;
      if (depth == 0) {
        t.resize(i);
        break;
      }
    }
  }
  if (t.rfind("void ", 0) == 0) t = t.substr(5);
  while (!t.empty() && t.back() == ' ') t.pop_back();
  return t;
}

std::string where(const State& s, const Fiber* f) {
  std::ostringstream o;
  o << "kernel " << (s.kernel_name.empty() ? symbol_name(s.kernel) : s.kernel_name) << ", block ("
    << s.bidx.x << ", " << s.bidx.y << ", " << s.bidx.z << ") of (" << s.grid.x << ", "
    << s.grid.y << ", " << s.grid.z << ")";
  if (f) o << ", thread (" << f->tid.x << ", " << f->tid.y << ", " << f->tid.z << ")";
  o << ", blockDim (" << s.block.x << ", " << s.block.y << ", " << s.block.z << ")";
  return o.str();
}

std::string at_site(const Fiber& f) {
  std::ostringstream o;
  o << (f.kind < 0 ? "__syncwarp" : "a shuffle") << " at " << f.file << ":" << f.line;
  return o.str();
}

// Collectives are identified by their source line: the compiler may duplicate one call (tail
// duplication), and the GPU's rule is about the collective the source names.
bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// ---- switching ---------------------------------------------------------------------------------
void fiber_main();

void yield_to_scheduler(Fiber* f, bool dying) {
  State& s = st();
  start_switch(dying ? nullptr : &f->fake_stack, s.sched_stack_bottom, s.sched_stack_size);
  swapcontext(&f->ctx, &s.sched);
  finish_switch(f->fake_stack, nullptr, nullptr);
}

// A violation found by the running thread: record it and leave the block for good.
[[noreturn]] void fail_in_fiber(const std::string& msg) {
  State& s = st();
  Fiber* f = s.cur;
  if (!s.failed) {
    s.failed = true;
    s.error = "fastnorm emulator: " + msg + " (" + where(s, f) + ")";
  }
  f->wait = Wait::kExited;
  f->runnable = false;
  yield_to_scheduler(f, true);
  std::abort();  // never resumed
}

bool fail_in_scheduler(const Fiber* f, const std::string& msg) {
  State& s = st();
  if (!s.failed) {
    s.failed = true;
    s.error = "fastnorm emulator: " + msg + " (" + where(s, f) + ")";
  }
  return false;
}

void fiber_main() {
  State& s = st();
  finish_switch(nullptr, &s.sched_stack_bottom, &s.sched_stack_size);
  s.body(s.body_ctx);
  Fiber* f = s.cur;
  f->wait = Wait::kExited;
  f->runnable = false;
  yield_to_scheduler(f, true);
  std::abort();
}

void resume(Fiber* f) {
  State& s = st();
  s.cur = f;
  start_switch(&s.sched_fake, f->stack, kStackBytes);
  swapcontext(&s.sched, &f->ctx);
  finish_switch(s.sched_fake, nullptr, nullptr);
  s.cur = nullptr;
}

// A scheduling point of the running thread: wait there until the scheduler releases it.
void block_here(Fiber* f) {
  f->runnable = false;
  yield_to_scheduler(f, false);
}

Fiber* running(const char* what) {
  Fiber* f = st().cur;
  if (f == nullptr) {
    std::fprintf(stderr, "fastnorm emulator: %s called outside a kernel\n", what);
    std::abort();
  }
  return f;
}

// ---- blocks --------------------------------------------------------------------------------------
void init_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (mem == MAP_FAILED) {
      std::perror("fastnorm emulator: mmap");
      std::abort();
    }
    mprotect(mem, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    f.stack = static_cast<char*>(mem) + page;
    getcontext(&f.ctx);
  }
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main, 0);
}

void free_block_shared(State& s) {
  for (auto& kv : s.shared) std::free(kv.second);
  s.shared.clear();
  s.static_shared = 0;
  std::free(s.dyn);
  s.dyn = nullptr;
}

std::vector<int> run_order(State& s) {
  std::vector<int> order;
  for (int i = 0; i < s.nthreads; ++i)
    if (s.fibers[i].runnable) order.push_back(i);
  if (s.cfg.thread_order == 1) std::reverse(order.begin(), order.end());
  if (s.cfg.thread_order == 2) std::shuffle(order.begin(), order.end(), s.rng);
  return order;
}

// Source lane of a shuffle, as PTX's shfl.sync defines it (c = ((32 - width) << 8) | clamp).
int shfl_source(int mode, int lane, int b, int width) {
  const int segmask = (32 - width) & 0x1f;
  const int clamp = mode == kShflUp ? 0 : 0x1f;
  const int max_lane = (lane & segmask) | (clamp & ~segmask);
  const int min_lane = lane & segmask;
  int j = lane;
  bool ok = true;
  switch (mode) {
    case kShflUp: j = lane - b; ok = j >= max_lane; break;
    case kShflDown: j = lane + b; ok = j <= max_lane; break;
    case kShflBfly: j = lane ^ b; ok = j <= max_lane; break;
    default: j = min_lane | (b & 0x1f & ~segmask); ok = j <= max_lane; break;
  }
  return ok ? j : lane;
}

// All live threads wait somewhere: perform the warp collectives whose lanes are all there, else
// release a barrier every live thread has reached. false: a violation (recorded).
bool resolve(State& s) {
  bool progress = false;
  for (int i = 0; i < s.nthreads; ++i) {
    Fiber& f = s.fibers[i];
    if (f.wait != Wait::kWarp) continue;
    const unsigned m = f.mask;
    if (!((m >> f.lane) & 1u)) {
      std::ostringstream o;
      o << at_site(f) << " with mask 0x" << std::hex << m << " that leaves out the calling lane "
        << std::dec << f.lane;
      return fail_in_scheduler(&f, o.str());
    }
    const int base = f.warp * 32;
    for (int l = 0; l < 32; ++l) {
      if (!((m >> l) & 1u)) continue;
      std::ostringstream o;
      o << at_site(f) << " with mask 0x" << std::hex << m << std::dec << ": lane " << l;
      if (base + l >= s.nthreads)
        return fail_in_scheduler(&f, o.str() + " does not exist (" +
                                         std::to_string(s.nthreads) + " threads in the block)");
      const Fiber& g = s.fibers[base + l];
      if (g.wait == Wait::kExited) return fail_in_scheduler(&f, o.str() + " has exited");
      if (g.wait == Wait::kBarrier)
        return fail_in_scheduler(&f, o.str() + " waits at __syncthreads at " + g.file + ":" +
                                         std::to_string(g.line));
      if (!same_site(g, f) || g.kind != f.kind || g.mask != f.mask || g.width != f.width)
        return fail_in_scheduler(&f, "lanes meet at different warp collectives: lane " +
                                         std::to_string(f.lane) + " at " + at_site(f) + ", lane " +
                                         std::to_string(l) + " at " + at_site(g) +
                                         " (or another mask or width)");
    }
    if (f.kind >= 0) {
      const int w = f.width;
      if (w < 1 || w > 32 || (w & (w - 1)) != 0)
        return fail_in_scheduler(&f, at_site(f) + ": width " + std::to_string(w) +
                                         " is not a power of two in [1, 32]");
      for (int l = 0; l < 32; ++l) {
        if (!((m >> l) & 1u)) continue;
        Fiber& g = s.fibers[base + l];
        const int j = shfl_source(g.kind, l, g.b, w);
        if (!((m >> j) & 1u))
          return fail_in_scheduler(&g, at_site(g) + ": lane " + std::to_string(l) +
                                           " reads lane " + std::to_string(j) +
                                           ", which is not in the mask");
        g.result = s.fibers[base + j].value;
      }
    }
    for (int l = 0; l < 32; ++l) {
      if (!((m >> l) & 1u)) continue;
      Fiber& g = s.fibers[base + l];
      g.wait = Wait::kNone;
      g.runnable = true;
    }
    progress = true;
  }
  if (progress) return true;
  // no warp collective pending: every live thread is at a barrier
  const Fiber* first = nullptr;
  for (int i = 0; i < s.nthreads; ++i) {
    Fiber& f = s.fibers[i];
    if (f.wait == Wait::kExited) continue;
    if (f.wait != Wait::kBarrier)
      return fail_in_scheduler(&f, "a thread neither at a barrier nor exited: scheduler bug");
    if (first == nullptr) {
      first = &f;
    } else if (!same_site(f, *first)) {
      return fail_in_scheduler(
          &f, "threads of one block wait at different __syncthreads: this one at " +
                  std::string(f.file) + ":" + std::to_string(f.line) + ", thread (" +
                  std::to_string(first->tid.x) + ", " + std::to_string(first->tid.y) + ", " +
                  std::to_string(first->tid.z) + ") at " + first->file + ":" +
                  std::to_string(first->line));
    }
  }
  for (int i = 0; i < s.nthreads; ++i) {
    Fiber& f = s.fibers[i];
    if (f.wait == Wait::kBarrier) {
      f.wait = Wait::kNone;
      f.runnable = true;
    }
  }
  return true;
}

bool run_block(State& s) {
  const int bx = static_cast<int>(s.block.x), by = static_cast<int>(s.block.y);
  for (int i = 0; i < s.nthreads; ++i) {
    Fiber& f = s.fibers[i];
    init_fiber(f);
    f.linear = i;
    f.tid = uint3{static_cast<unsigned>(i % bx), static_cast<unsigned>((i / bx) % by),
                  static_cast<unsigned>(i / (bx * by))};
    f.warp = i / 32;
    f.lane = i % 32;
    f.wait = Wait::kNone;
    f.runnable = true;
    f.fake_stack = nullptr;
  }
  s.dyn = std::malloc(s.smem);
  if (s.smem) std::memset(s.dyn, 0xFF, s.smem);
  for (;;) {
    for (int i : run_order(s)) {
      resume(&s.fibers[i]);
      if (s.failed) return false;
    }
    bool live = false;
    for (int i = 0; i < s.nthreads && !live; ++i) live = s.fibers[i].wait != Wait::kExited;
    if (!live) break;
    if (!resolve(s)) return false;
  }
  const size_t optin = s.optin.count(s.kernel) ? static_cast<size_t>(s.optin[s.kernel]) : 0;
  const size_t limit = std::max(kSharedPerBlock, optin);
  if (s.static_shared > kSharedPerBlock || s.static_shared + s.smem > limit)
    return fail_in_scheduler(nullptr, std::to_string(s.static_shared) + " bytes of static and " +
                                          std::to_string(s.smem) +
                                          " bytes of dynamic shared memory exceed the " +
                                          std::to_string(limit) + "-byte limit");
  return true;
}

std::string launch_error(const State& s) {
  const uint64_t threads = uint64_t(s.block.x) * s.block.y * s.block.z;
  std::ostringstream o;
  if (s.block.x == 0 || s.block.y == 0 || s.block.z == 0 || s.grid.x == 0 || s.grid.y == 0 ||
      s.grid.z == 0)
    o << "a zero grid or block dimension";
  else if (threads > kMaxThreads || s.block.x > 1024 || s.block.y > 1024 || s.block.z > 64)
    o << "a block of " << threads << " threads (at most 1024; x, y <= 1024, z <= 64)";
  else if (s.grid.x > 2147483647u || s.grid.y > 65535u || s.grid.z > 65535u)
    o << "a grid beyond (2^31 - 1, 65535, 65535)";
  else {
    const auto it = s.optin.find(s.kernel);
    const size_t limit = it == s.optin.end() ? kSharedPerBlock : static_cast<size_t>(it->second);
    if (s.smem > limit)
      o << s.smem << " bytes of dynamic shared memory (limit " << limit
        << (it == s.optin.end() ? " without cudaFuncAttributeMaxDynamicSharedMemorySize" : "")
        << ")";
  }
  if (o.str().empty()) return "";
  return "fastnorm emulator: invalid launch: " + o.str() + " (kernel " + symbol_name(s.kernel) +
         ", grid (" + std::to_string(s.grid.x) + ", " + std::to_string(s.grid.y) + ", " +
         std::to_string(s.grid.z) + "), block (" + std::to_string(s.block.x) + ", " +
         std::to_string(s.block.y) + ", " + std::to_string(s.block.z) + "))";
}

#if FASTNORM_EMU_ASAN
// A sanitizer report ends the process: say which kernel, block and thread were running.
void on_sanitizer_death() {
  State& s = st();
  if (s.cur != nullptr)
    std::fprintf(stderr, "fastnorm emulator: the sanitizer stopped %s\n", where(s, s.cur).c_str());
}
const bool kDeathCallback = (__sanitizer_set_death_callback(on_sanitizer_death), true);
#endif

}  // namespace

// ---- device-side entry points ----------------------------------------------------------------
const uint3& thread_idx() { return running("threadIdx")->tid; }
const uint3& block_idx() { return st().bidx; }
const dim3& block_dim() { return st().block; }
const dim3& grid_dim() { return st().grid; }

void syncthreads_at(const char* file, int line) {
  Fiber* f = running("__syncthreads");
  f->wait = Wait::kBarrier;
  f->file = file;
  f->line = line;
  block_here(f);
}

void syncwarp_at(const char* file, int line, unsigned mask) {
  Fiber* f = running("__syncwarp");
  f->wait = Wait::kWarp;
  f->file = file;
  f->line = line;
  f->kind = -1;
  f->mask = mask;
  f->width = 32;
  block_here(f);
}

uint64_t shfl_at(const char* file, int line, ShflMode mode, unsigned mask, uint64_t bits, int b,
                 int width) {
  Fiber* f = running("a shuffle");
  f->wait = Wait::kWarp;
  f->file = file;
  f->line = line;
  f->kind = mode;
  f->mask = mask;
  f->b = b;
  f->width = width;
  f->value = bits;
  block_here(f);
  return f->result;
}

void kernel_entry(const char* pretty_function, int max_threads, int /*min_blocks*/) {
  State& s = st();
  if (s.entered) return;
  s.entered = true;
  s.kernel_name = pretty_function;
  ++s.coverage[s.kernel_name];
  const int threads = s.nthreads;
  if (max_threads > 0 && threads > max_threads)
    fail_in_fiber("a block of " + std::to_string(threads) +
                  " threads exceeds the kernel's __launch_bounds__(" +
                  std::to_string(max_threads) + ")");
}

void* block_shared(const void* key, size_t bytes) {
  State& s = st();
  running("__shared__");
  for (auto& kv : s.shared)
    if (kv.first == key) return kv.second;
  void* p = std::malloc(bytes);
  std::memset(p, 0xFF, bytes);
  s.shared.emplace_back(key, p);
  s.static_shared += bytes;
  return p;
}

uint64_t occupancy_epoch() { return st().occupancy_epoch.load(); }

void* dynamic_shared() {
  running("extern __shared__");
  return st().dyn;
}

// ---- host side ------------------------------------------------------------------------------------
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, BlockBody body, void* ctx) {
  State& s = st();
  std::lock_guard<std::recursive_mutex> lock(s.mu);
  s.kernel = kernel;
  s.kernel_name.clear();
  s.entered = false;
  s.grid = grid;
  s.block = block;
  s.smem = smem;
  s.body = body;
  s.body_ctx = ctx;
  s.failed = false;
  s.error.clear();
  ++s.launches;
  const std::string bad = launch_error(s);
  TORCH_CHECK(bad.empty(), bad);
  if (s.cfg.record_only) {
    // The host code never reads device results (no synchronisation), so its launches are the
    // same whether or not the kernels run: the plan of a call without executing it.
    std::ostringstream o;
    o << symbol_name(kernel) << "\t" << grid.x << "," << grid.y << "," << grid.z << "\t" << block.x
      << "," << block.y << "," << block.z << "\t" << smem;
    s.recorded.push_back(o.str());
    return;
  }
  s.nthreads = static_cast<int>(block.x * block.y * block.z);
  if (static_cast<int>(s.fibers.size()) < s.nthreads) s.fibers.resize(s.nthreads);
  s.rng.seed(s.cfg.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(s.launches));
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t k = 0; k < blocks && !s.failed; ++k) {
    const uint64_t b = s.cfg.block_order == 1 ? blocks - 1 - k : k;
    s.bidx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                   static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
    const bool ok = run_block(s);
    if (!ok) {
#if FASTNORM_EMU_ASAN
      // abandoned fibers leave their frames' redzones poisoned
      for (int i = 0; i < s.nthreads; ++i) ASAN_UNPOISON_MEMORY_REGION(s.fibers[i].stack, kStackBytes);
#endif
    }
    free_block_shared(s);
  }
  s.cur = nullptr;
  TORCH_CHECK(!s.failed, s.error);
}

}  // namespace fastnorm_emu

// ---- the CUDA runtime calls of the host code ------------------------------------------------
using fastnorm_emu::st;

extern "C" {

// cudaOccMaxActiveBlocksPerMultiprocessor of cuda_occupancy.h for sm_90 (default carveout):
// the least of the warp, block, register, shared memory and barrier limits. regs == 0: registers
// unknown (no limit from them).
int fastnorm_emu_resident_blocks(int threads, int regs, int static_smem, int dynamic_smem,
                                 int barriers) {
  if (threads <= 0 || threads > 1024) return 0;
  const int warps = (threads + 31) / 32;
  int n = std::min(32, 64 / warps);
  if (regs > 0) {
    const int per_warp = (regs * 32 + 255) / 256 * 256;
    if (regs > 255 || per_warp * warps > 65536 || per_warp * ((warps + 3) / 4 * 4) > 65536) return 0;
    n = std::min(n, (16384 / per_warp) * 4 / warps);
  }
  const long bytes = (static_cast<long>(static_smem) + dynamic_smem + 1024 + 127) / 128 * 128;
  if (bytes > 227 * 1024 + 1024) return 0;
  n = std::min<long>(n, static_cast<long>(fastnorm_emu::kSharedPerSm) / bytes);
  if (barriers > 0) n = std::min(n, 64 / barriers);
  return n;
}

cudaError_t cudaGetDevice(int* device) {
  *device = st().device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  auto& s = st();
  if (device < 0 || device >= static_cast<int>(s.devices.size())) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = s.devices[device].first; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = 32; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = 65536; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrL2CacheSize: *value = 50 * 1024 * 1024; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// Resident blocks per SM: the device's configured answer; else the occupancy calculator's
// arithmetic for sm_90 (cuda_occupancy.h; fastnorm/resources.py's resident_blocks, which the test
// compares with this) with the kernel's registers and static shared memory from the CUDA build's
// resource report when one was loaded; else from warps and dynamic shared memory alone.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* num_blocks, const void* func,
                                                                    int block_size, size_t smem,
                                                                    unsigned int) {
  auto& s = st();
  std::lock_guard<std::recursive_mutex> lock(s.mu);
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  const int fixed = s.devices[s.device].second;
  const std::string name = fastnorm_emu::signature_head(fastnorm_emu::symbol_name(func));
  const char* source = "device";
  if (fixed > 0) {
    *num_blocks = fixed;
  } else {
    int regs = 0, static_smem = 0, barriers = 0;
    const auto it = s.resources.find(name);
    if (it != s.resources.end()) {
      std::tie(regs, static_smem, barriers) = it->second;
      source = "report";
    } else {
      source = "threads";
    }
    *num_blocks = fastnorm_emu_resident_blocks(block_size, regs, static_smem,
                                               static_cast<int>(smem), barriers);
  }
  if (s.cfg.record_only)
    s.occupancy_log.push_back(name + "\t" + std::to_string(block_size) + "\t" + std::to_string(smem) +
                              "\t" + std::to_string(*num_blocks) + "\t" + source);
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > fastnorm_emu::kSharedPerBlockOptin)
      return cudaErrorInvalidValue;
    st().optin[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }

// ---- controls for the tests (ctypes) -----------------------------------------------------------
// Another device size is another device ordinal, so host caches keyed by device stay correct.
void fastnorm_emu_configure(int thread_order, int block_order, unsigned long long seed,
                            int sm_count, int blocks_per_sm) {
  auto& s = st();
  std::lock_guard<std::recursive_mutex> lock(s.mu);
  s.cfg.thread_order = thread_order;
  s.cfg.block_order = block_order;
  s.cfg.seed = seed;
  const std::pair<int, int> dev{sm_count, blocks_per_sm};
  auto it = std::find(s.devices.begin(), s.devices.end(), dev);
  if (it == s.devices.end()) {
    s.devices.push_back(dev);
    it = s.devices.end() - 1;
  }
  s.device = static_cast<int>(it - s.devices.begin());
}

// Copies `out` (NUL-terminated, cut to cap) into buf; returns the size a full copy needs.
static long copy_out(const std::string& out, char* buf, long cap) {
  if (buf && cap > 0) {
    const long n = std::min<long>(cap - 1, static_cast<long>(out.size()));
    std::memcpy(buf, out.data(), n);
    buf[n] = 0;
  }
  return static_cast<long>(out.size()) + 1;
}

// "count<TAB>kernel signature" lines into buf; returns the length needed.
long fastnorm_emu_coverage(char* buf, long cap) {
  auto& s = st();
  std::lock_guard<std::recursive_mutex> lock(s.mu);
  std::string out;
  for (auto& kv : s.coverage) out += std::to_string(kv.second) + "\t" + kv.first + "\n";
  return copy_out(out, buf, cap);
}

long fastnorm_emu_launches(void) { return st().launches; }

// Record launches instead of running them (1), or run them again (0); starting clears the record.
void fastnorm_emu_record_only(int on) {
  auto& s = st();
  std::lock_guard<std::recursive_mutex> lock(s.mu);
  s.cfg.record_only = on != 0;
  if (on) {
    s.recorded.clear();
    s.occupancy_log.clear();
    ++s.occupancy_epoch;  // host caches ask again: the log then has every query of the record
  }
}

// The recorded launches, one per line; returns the length needed.
long fastnorm_emu_recorded(char* buf, long cap) {
  auto& s = st();
  std::lock_guard<std::recursive_mutex> lock(s.mu);
  std::string out;
  for (auto& r : s.recorded) out += r + "\n";
  return copy_out(out, buf, cap);
}

int fastnorm_emu_sanitized(void) { return FASTNORM_EMU_ASAN; }

// One kernel instantiation's resources from the CUDA build ("ns::name<args>"); an empty name
// clears the table (occupancy from threads and shared memory again).
void fastnorm_emu_kernel_resources(const char* name, int regs, int static_smem, int barriers) {
  auto& s = st();
  std::lock_guard<std::recursive_mutex> lock(s.mu);
  ++s.occupancy_epoch;  // other registers or shared memory: other answers
  if (name == nullptr || *name == 0) {
    s.resources.clear();
    return;
  }
  s.resources[name] = std::make_tuple(regs, static_smem, barriers);
}

// The occupancy queries made while launches were recorded, one per line; returns the length needed.
long fastnorm_emu_occupancy_log(char* buf, long cap) {
  auto& s = st();
  std::lock_guard<std::recursive_mutex> lock(s.mu);
  std::string out;
  for (auto& r : s.occupancy_log) out += r + "\n";
  return copy_out(out, buf, cap);
}

}  // extern "C"

// Large CPU blocks reused inside a scope (sdlab.models.cpu_memory): an allocator put in front of PyTorch's.
//
// glibc hands every block of 32 MiB or more (its largest mmap threshold) out as a fresh mapping and unmaps it
// on free, so each of a VAE decode's large activations is memory the kernel zeroes page by page on first
// touch (and on a virtual machine the host may have to back it first). Inside a scope this allocator keeps
// such blocks when they are freed and serves later large requests from them:
//   - a free range at least as large: its head (best fit; a tail of 1 MiB or more stays free), no system call;
//   - else the free ranges moved into one new mapping with mremap (page tables moved, no copy) and the
//     remainder left fresh, so fresh pages are only ever taken once all kept ones are in use.
// So the memory held never exceeds the most the scope's large blocks needed at once, and fresh pages are that
// peak, not the sum of all requests. Kept ranges are unmapped when no large block is in use any more (an
// encoder past its large levels holds nothing for the rest of its call), beyond the `kMaxKept` largest, and
// when the outermost scope ends; blocks freed outside a scope are unmapped at once. Smaller requests go to the
// allocator it replaced.
//
// A block is a list of segments: a range moved into a mapping becomes a mapping of its own, and mremap moves
// only ranges inside one mapping, so each segment is moved or unmapped whole (or split into head and tail).
// `kMaxKept` bounds the segments kept, and so the mappings a block is made of.
#include <torch/extension.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kLarge = size_t(32) << 20;   // glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
constexpr size_t kPage = 4096;
constexpr size_t kMinTail = size_t(1) << 20;  // a head's tail below this is unmapped, not kept
constexpr size_t kMaxKept = 16;               // kept segments beyond the largest 16 are unmapped

struct Segment {
  char* addr;
  size_t bytes;
};

class ReusingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kLarge) return base_.load(std::memory_order_acquire)->allocate(n);
    TORCH_CHECK_WITH(OutOfMemoryError, n <= std::numeric_limits<size_t>::max() - kPage, "cannot allocate ", n,
                     " bytes");
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Segment> block = depth_ > 0 ? from_kept(bytes) : std::vector<Segment>{};
    if (block.empty()) block.push_back(fresh(bytes));
    char* data = block.front().addr;
    live_bytes_ += bytes;
    live_peak_ = std::max(live_peak_, live_bytes_);
    live_.emplace(data, std::move(block));
    report(data, int64_t(bytes));
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static ReusingAllocator& instance() {
    static auto* allocator = new ReusingAllocator();   // never destroyed: blocks may be freed at exit
    return *allocator;
  }

  bool enter() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (base_.load(std::memory_order_relaxed) == nullptr) {
      c10::Allocator* current = c10::GetCPUAllocator();
      base_.store(current, std::memory_order_release);   // before any thread can reach this allocator
      c10::SetCPUAllocator(this, /*priority=*/1);
      // A process forked while another thread holds the lock would find it held for good: take it around fork.
      if (c10::GetCPUAllocator() == this)
        pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                       [] { instance().mutex_.unlock(); });
    }
    if (c10::GetCPUAllocator() != this) return false;   // another allocator of higher priority stays
    if (depth_++ == 0) live_peak_ = live_bytes_;
    return true;
  }

  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_ > 0 && --depth_ == 0) unmap_kept(0);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(depth_), int64_t(live_bytes_), int64_t(live_peak_), int64_t(kept_bytes_), int64_t(fresh_bytes_),
            int64_t(kept_.size())};
  }

 private:
  static void release(void* data) {
    ReusingAllocator& self = instance();
    std::unique_lock<std::mutex> lock(self.mutex_);
    auto it = self.live_.find(data);
    if (it == self.live_.end()) {           // a smaller block: the replaced allocator's
      lock.unlock();
      self.base_.load(std::memory_order_acquire)->raw_deleter()(data);
      return;
    }
    size_t bytes = 0;
    for (const Segment& s : it->second) {
      bytes += s.bytes;
      if (self.depth_ > 0) {
        self.kept_.push_back(s);
        self.kept_bytes_ += s.bytes;
      } else {
        munmap(s.addr, s.bytes);
      }
    }
    self.live_.erase(it);
    self.live_bytes_ -= bytes;
    self.report(data, -int64_t(bytes));
    self.unmap_kept(self.live_bytes_ == 0 ? 0 : kMaxKept);   // nothing large in use: nothing worth keeping
  }

  // Tell PyTorch's memory profiler, as its own CPU allocator does.
  void report(void* data, int64_t delta) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(data, delta, live_bytes_, live_bytes_ + kept_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  // Unmap all kept segments but the `keep` largest.
  void unmap_kept(size_t keep) {
    if (kept_.size() <= keep) return;
    std::sort(kept_.begin(), kept_.end(), [](const Segment& a, const Segment& b) { return a.bytes > b.bytes; });
    for (size_t i = keep; i < kept_.size(); ++i) {
      munmap(kept_[i].addr, kept_[i].bytes);
      kept_bytes_ -= kept_[i].bytes;
    }
    kept_.resize(keep);
  }

  // A new mapping of `bytes` (pages untouched until written).
  Segment fresh(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK_WITH(OutOfMemoryError, p != MAP_FAILED, "could not map ", bytes, " bytes of memory");
    fresh_bytes_ += bytes;
    return {static_cast<char*>(p), bytes};
  }

  // `bytes` from the kept segments (empty when none are kept): the head of the smallest one that is large
  // enough, else all of them moved (largest first) into one new mapping that fresh pages complete.
  std::vector<Segment> from_kept(size_t bytes) {
    if (kept_.empty()) return {};
    auto fits = kept_.end();
    for (auto it = kept_.begin(); it != kept_.end(); ++it) {
      if (it->bytes >= bytes && (fits == kept_.end() || it->bytes < fits->bytes)) fits = it;
    }
    if (fits != kept_.end()) {
      Segment head{fits->addr, bytes};
      take(fits, bytes);
      return {head};
    }
    std::sort(kept_.begin(), kept_.end(), [](const Segment& a, const Segment& b) { return a.bytes > b.bytes; });
    Segment whole = fresh(bytes);
    fresh_bytes_ -= bytes;   // counted below: only the part no kept segment covers
    std::vector<Segment> block;
    size_t offset = 0;
    while (offset < bytes && !kept_.empty()) {
      auto it = kept_.begin();
      const size_t part = std::min(it->bytes, bytes - offset);
      void* moved = mremap(it->addr, part, part, MREMAP_MAYMOVE | MREMAP_FIXED, whole.addr + offset);
      if (moved == MAP_FAILED) {   // the rest is fresh; what could not move is unmapped, so the bound holds
        unmap_kept(0);
        break;
      }
      block.push_back({whole.addr + offset, part});
      take(it, part);
      offset += part;
    }
    if (offset < bytes) {
      block.push_back({whole.addr + offset, bytes - offset});
      fresh_bytes_ += bytes - offset;
    }
    return block;
  }

  // The first `bytes` of kept segment `it` leave the kept list; the rest stays kept if 1 MiB or more.
  void take(std::vector<Segment>::iterator it, size_t bytes) {
    kept_bytes_ -= it->bytes;
    const Segment tail{it->addr + bytes, it->bytes - bytes};
    kept_.erase(it);
    if (tail.bytes >= kMinTail) {
      kept_.push_back(tail);
      kept_bytes_ += tail.bytes;
    } else if (tail.bytes > 0) {
      munmap(tail.addr, tail.bytes);
    }
  }

  std::atomic<c10::Allocator*> base_{nullptr};
  std::mutex mutex_;
  int depth_ = 0;
  std::vector<Segment> kept_;
  std::unordered_map<void*, std::vector<Segment>> live_;
  size_t live_bytes_ = 0, live_peak_ = 0, kept_bytes_ = 0, fresh_bytes_ = 0;
};

}  // namespace

bool reuse_enter() { return ReusingAllocator::instance().enter(); }
void reuse_leave() { ReusingAllocator::instance().leave(); }
std::vector<int64_t> reuse_stats() { return ReusingAllocator::instance().stats(); }

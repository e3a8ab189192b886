/* A CPU allocator for PyTorch tensors that keeps freed blocks and hands them out again.
 *
 * Built by vitlab/memory.py against the installed PyTorch's headers and libc10. While a scope is open
 * (vitlab_reuse_enter ... vitlab_reuse_exit) it is c10's CPU allocator, so every CPU tensor's memory
 * comes from here. A block of 4 KiB or more is remembered with its size (rounded up to 64 bytes); when
 * its tensor dies it goes into a free list for that size, up to a limit on the bytes so kept, and the
 * next request of the same size takes it back. A training step allocates the same few dozen sizes
 * every time, so after the first step nothing goes back to the C library, and nothing is faulted in
 * from the OS page by page. Smaller blocks go straight to the C library, whose own caches serve them.
 *
 * Blocks outlive scopes: a tensor made inside and freed after a scope closed returns its block to the
 * free list while keeping is on (vitlab_reuse_clear turns it off and frees the list), else to the C
 * library. The allocator object is never destroyed, so a block's deleter always finds it. All of it
 * is guarded by one mutex: tensors may be freed on any thread, and a fork waits for it.
 */
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <pthread.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kAlignment = 64;  /* as c10's own CPU allocator aligns */
constexpr size_t kSmallest = 4096; /* below this, the C library's caches do well */

std::mutex mutex;
std::unordered_map<size_t, std::vector<void *>> free_lists; /* rounded size -> blocks ready to hand out */
std::unordered_map<void *, size_t> sizes;                  /* every block of ours, in use or free */
size_t kept_bytes = 0;
size_t limit_bytes = size_t(1) << 30;
bool keeping = false;
c10::Allocator *previous = nullptr;

void release(void *data) {
    if (data == nullptr) return;
    {
        std::lock_guard<std::mutex> guard(mutex);
        auto it = sizes.find(data);
        if (it != sizes.end()) {
            const size_t size = it->second;
            if (keeping && kept_bytes + size <= limit_bytes) {
                free_lists[size].push_back(data);
                kept_bytes += size;
                return;
            }
            sizes.erase(it);
        }
    }
    std::free(data);
}

struct ReuseAllocator final : c10::Allocator {
    c10::DataPtr allocate(size_t nbytes) override {
        const c10::Device cpu(c10::DeviceType::CPU);
        if (nbytes == 0) return {nullptr, nullptr, &release, cpu};
        const size_t size = (nbytes + kAlignment - 1) & ~(kAlignment - 1);
        void *data = nullptr;
        if (size >= kSmallest) {
            std::lock_guard<std::mutex> guard(mutex);
            auto it = free_lists.find(size);
            if (it != free_lists.end() && !it->second.empty()) {
                data = it->second.back();
                it->second.pop_back();
                kept_bytes -= size;
            }
        }
        if (data == nullptr) {
            if (posix_memalign(&data, kAlignment, size) != 0) data = nullptr;
            TORCH_CHECK(data != nullptr, "vitlab's reusing allocator: out of memory allocating ", nbytes, " bytes");
            if (size >= kSmallest) {
                std::lock_guard<std::mutex> guard(mutex);
                sizes.emplace(data, size);
            }
        }
        return {data, data, &release, cpu};
    }

    c10::DeleterFnPtr raw_deleter() const override { return &release; }

    void copy_data(void *dest, const void *src, std::size_t count) const override {
        default_copy_data(dest, src, count);
    }
};

ReuseAllocator *const allocator = new ReuseAllocator();

/* A process forked while another thread holds the mutex (a DataLoader's workers, say) would find it
 * locked forever: the fork waits for it, and both sides let it go. */
const int at_fork = pthread_atfork([] { mutex.lock(); }, [] { mutex.unlock(); }, [] { mutex.unlock(); });

}  // namespace

extern "C" {

/* Makes this c10's CPU allocator and turns keeping on; -> 1, or 0 where an allocator registered with a
 * higher priority holds the place (then nothing changes). */
int vitlab_reuse_enter() {
    c10::Allocator *current = c10::GetCPUAllocator();
    if (current != allocator) {
        c10::SetCPUAllocator(allocator, 0);
        if (c10::GetCPUAllocator() != allocator) return 0;
        previous = current;
    }
    std::lock_guard<std::mutex> guard(mutex);
    keeping = true;
    return 1;
}

/* Gives c10 back the allocator it had before; blocks in use stay valid, and kept blocks stay kept. */
void vitlab_reuse_exit() {
    if (c10::GetCPUAllocator() == allocator && previous != nullptr) c10::SetCPUAllocator(previous, 0);
}

/* Frees every kept block and turns keeping off, so blocks freed from now on go to the C library;
 * -> the bytes freed. */
size_t vitlab_reuse_clear() {
    std::vector<void *> blocks;
    size_t freed;
    {
        std::lock_guard<std::mutex> guard(mutex);
        keeping = false;
        for (auto &list : free_lists)
            for (void *block : list.second) {
                blocks.push_back(block);
                sizes.erase(block);
            }
        free_lists.clear();
        freed = kept_bytes;
        kept_bytes = 0;
    }
    for (void *block : blocks) std::free(block);
    return freed;
}

size_t vitlab_reuse_kept_bytes() {
    std::lock_guard<std::mutex> guard(mutex);
    return kept_bytes;
}

/* The most bytes the free lists may hold; a block freed beyond it goes to the C library. */
void vitlab_reuse_set_limit(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex);
    limit_bytes = bytes;
}

int vitlab_reuse_active() { return c10::GetCPUAllocator() == allocator; }

}  /* extern "C" */

// The caching allocator's counters of an accelerator (CUDA) device, as
// torch.cuda.memory_stats() reads them: libtorch exposes them to C++ only
// (at::accelerator::getDeviceStats), tch not at all. C ABI for src/exec/allocator.rs.
#include <ATen/DeviceAccelerator.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace {
void set_error(const char* what, char* err, size_t errlen) {
  if (errlen == 0) return;
  std::strncpy(err, what, errlen - 1);
  err[errlen - 1] = '\0';
}
}  // namespace

// out[0..4]: reserved current, reserved peak, allocated current, allocated peak (bytes).
// Returns 0 on success, 1 when libtorch has no accelerator, -1 on error (message in err).
extern "C" int runner_allocator_stats(int device, int64_t* out, char* err, size_t errlen) {
  try {
    if (!at::accelerator::getAccelerator(false).has_value()) return 1;
    const auto stats = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.reserved_bytes[all].current;
    out[1] = stats.reserved_bytes[all].peak;
    out[2] = stats.allocated_bytes[all].current;
    out[3] = stats.allocated_bytes[all].peak;
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what(), err, errlen);
    return -1;
  }
}

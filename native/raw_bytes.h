// RawBytes: a byte vector whose resize() leaves the new bytes uninitialized.
//
// std::vector<uint8_t>::resize value-initializes (zeroes) every new byte. A frame that
// is filled by a memcpy right after (a forwarded record, a CP frame's body) paid for a
// memset of every byte it sends: 22% of the source's event loop in a profiled baseline.
// Only for buffers whose bytes are all written before they are read.
#pragma once

#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace nvm {

// An allocator that default-initializes (for uint8_t: leaves alone) instead of value-initializing.
template <typename T, typename Base = std::allocator<T>>
class DefaultInitAllocator : public Base {
  using Traits = std::allocator_traits<Base>;

 public:
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U, typename Traits::template rebind_alloc<U>>;
  };
  using Base::Base;
  DefaultInitAllocator() = default;

  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible<U>::value) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    Traits::construct(static_cast<Base&>(*this), p, std::forward<Args>(args)...);
  }
};

using RawBytes = std::vector<uint8_t, DefaultInitAllocator<uint8_t>>;

}  // namespace nvm

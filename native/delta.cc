// Block deltas for the mirror's metadata blocks (src/mirror/delta.ts has the format and
// the rules; this is its encoder, run once per address or space-map block a mirrored CP
// rewrites, where the TypeScript loop cost ~10 us a block).
//
// Exports:
//   deltaEncode(prev, next, out) -> bytes written to out, or -1 when the delta does not
//       fit out (the caller sends the block instead). prev and next are 4 KiB.
//
// Invariants:
// - The output is byte for byte what delta.ts encodeDeltaJs produces for the same blocks
//   and limit (runs of differing 8-byte words, a single equal word bridged, in order;
//   test/unit/mirror-delta.test.ts compares the two on random blocks).
// - Nothing is written past out's length; arguments are re-checked and bad ones throw.
#include "common.h"

#include <cstring>

namespace nvm {
namespace {

constexpr size_t kBlock = 4096;
constexpr size_t kWord = 8;
constexpr size_t kWords = kBlock / kWord;
constexpr size_t kLineWords = 256 / kWord;
constexpr size_t kRunHeader = 4;

inline bool WordDiffers(const uint8_t* a, const uint8_t* b, size_t w) {
  return std::memcmp(a + w * kWord, b + w * kWord, kWord) != 0;
}

// -1: more than cap bytes.
long Encode(const uint8_t* prev, const uint8_t* next, uint8_t* out, size_t cap) {
  size_t size = 0;
  size_t w = 0;
  while (w < kWords) {
    if (w % kLineWords == 0 && std::memcmp(prev + w * kWord, next + w * kWord, kLineWords * kWord) == 0) {
      w += kLineWords;
      continue;
    }
    if (!WordDiffers(prev, next, w)) {
      w++;
      continue;
    }
    size_t end = w + 1;
    while (end < kWords) {
      if (WordDiffers(prev, next, end)) end++;
      else if (end + 1 < kWords && WordDiffers(prev, next, end + 1)) end += 2;
      else break;
    }
    const size_t bytes = (end - w) * kWord;
    if (size + kRunHeader + bytes > cap) return -1;
    out[size] = static_cast<uint8_t>(w & 0xff);
    out[size + 1] = static_cast<uint8_t>(w >> 8);
    out[size + 2] = static_cast<uint8_t>((end - w) & 0xff);
    out[size + 3] = static_cast<uint8_t>((end - w) >> 8);
    std::memcpy(out + size + kRunHeader, next + w * kWord, bytes);
    size += kRunHeader + bytes;
    w = end;
  }
  return static_cast<long>(size);
}

Napi::Value DeltaEncode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "deltaEncode";
  Napi::Buffer<uint8_t> prev, next, out;
  if (!GetBuffer(info, 0, fn, "prev", &prev) || !GetBuffer(info, 1, fn, "next", &next) || !GetBuffer(info, 2, fn, "out", &out)) {
    return env.Undefined();
  }
  if (prev.Length() != kBlock || next.Length() != kBlock) {
    ThrowRange(env, "deltaEncode: prev and next must be 4096 bytes");
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(Encode(prev.Data(), next.Data(), out.Data(), out.Length())));
}

}  // namespace

void InitDelta(Napi::Env env, Napi::Object exports) {
  exports.Set("deltaEncode", Napi::Function::New(env, DeltaEncode, "deltaEncode"));
}

}  // namespace nvm

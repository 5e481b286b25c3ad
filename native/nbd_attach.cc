// Kernel nbd attach (generic netlink "nbd" family, ioctl fallback). Owned by the attach work (issue 3).
#include <napi.h>

void InitNbdAttach(Napi::Env /*env*/, Napi::Object /*exports*/) {}

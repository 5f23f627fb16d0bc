// flags: -fno-blocks
// expect: blocks support disabled
// The backend needs -fblocks (setup.py passes it on macOS): a build without it must be refused,
// not silently accepted.
#include "prelude.h"
void f(dispatch_queue_t q) { dispatch_async(q, ^{}); }

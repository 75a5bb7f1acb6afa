#ifndef CULVERT_CZLIB_SHIM_H
#define CULVERT_CZLIB_SHIM_H
#include <zlib.h>
#endif

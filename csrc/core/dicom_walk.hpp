// The element walk of a DICOM data set for ubc.io.dicom_scan: Part 10 data sets in implicit or
// explicit VR little endian, read from a byte buffer that may hold only the file's head. A
// pure C++17 function with no Python headers; every read is bounds-checked (fuzzed with the
// rest of the core), nothing is allocated beyond the list of elements found.
#pragma once

#include <cstdint>
#include <vector>

namespace ubc {

enum class WalkStatus {
    ok,        // the data set ends at the buffer's end, or at the pixel data
    short_of,  // the buffer ends inside an element: read more of the file
    unusual,   // something ubc.io.dicom_scan leaves to pydicom (see walk_elements)
};

// An element: its tag, VR (its two bytes as vr[0] | vr[1] << 8; 0 in implicit VR and for
// items and delimiters), the offset of its value and its length (0xFFFFFFFF: undefined).
struct WalkedElement {
    uint32_t tag;
    uint16_t vr;
    int64_t offset;
    uint32_t length;
};

// Nesting of undefined-length sequences and items the walk follows (each counts one: 32
// sequences deep); deeper is unusual (pydicom reads such a file).
inline constexpr int kMaxWalkDepth = 64;

struct Walk {
    WalkStatus status = WalkStatus::ok;
    std::vector<WalkedElement> kept;  // the wanted tags met at top level, in file order
    int64_t pixel_offset = -1;        // the top-level PixelData value (-1: none)
    int64_t pixel_length = 0;
};

// Walks buf[pos:size) as a data set: each element's value skipped by its length, sequences
// and items of undefined length by their delimiters (nested up to kMaxWalkDepth); stops at the
// top-level PixelData (7FE0,0010). Top-level elements whose tag is in wanted[0:n_wanted)
// (sorted ascending) are kept. complete: buf holds the whole file, so that the data set may end
// at its end (otherwise that is short_of). An element cut off by the buffer's end is short_of.
// Unusual: a refused tag (functional groups, float or double pixel data), an item or delimiter
// at top level, PixelData of undefined length, an undefined length with VR UN, nesting deeper
// than kMaxWalkDepth.
Walk walk_elements(const uint8_t* buf, int64_t size, int64_t pos, bool explicit_vr,
                   bool complete, const uint32_t* wanted, int64_t n_wanted);

}  // namespace ubc

#include "dicom_walk.hpp"

#include <algorithm>
#include <cstring>

namespace ubc {
namespace {

constexpr uint32_t kUndefined = 0xFFFFFFFFu;
constexpr uint32_t kItem = 0xFFFEE000u, kItemEnd = 0xFFFEE00Du, kSequenceEnd = 0xFFFEE0DDu;
constexpr uint32_t kPixelData = 0x7FE00010u;
constexpr uint32_t kRefused[] = {0x52009229u, 0x52009230u, 0x7FE00008u, 0x7FE00009u};
constexpr uint16_t vr_code(const char (&vr)[3]) {
    return static_cast<uint16_t>(static_cast<uint8_t>(vr[0]) | static_cast<uint8_t>(vr[1]) << 8);
}
constexpr uint16_t kLongVrs[] = {vr_code("OB"), vr_code("OD"), vr_code("OF"), vr_code("OL"),
                                 vr_code("OV"), vr_code("OW"), vr_code("SQ"), vr_code("SV"),
                                 vr_code("UC"), vr_code("UN"), vr_code("UR"), vr_code("UT"),
                                 vr_code("UV")};
constexpr uint16_t kUN = vr_code("UN");

struct Shortfall {};  // the buffer ends inside an element
struct Unusual {};

class Reader {
public:
    Reader(const uint8_t* buf, int64_t size) : buf_(buf), size_(size) {}
    int64_t size() const { return size_; }
    uint16_t u16(int64_t at) const { return static_cast<uint16_t>(read(at, 2)); }
    uint32_t u32(int64_t at) const { return static_cast<uint32_t>(read(at, 4)); }

private:
    uint64_t read(int64_t at, int64_t n) const {
        if (at < 0 || at > size_ - n) throw Shortfall{};
        uint64_t value = 0;
        for (int64_t i = n - 1; i >= 0; --i) value = value << 8 | buf_[at + i];
        return value;
    }
    const uint8_t* buf_;
    int64_t size_;
};

bool long_vr(uint16_t vr) {
    return std::find(std::begin(kLongVrs), std::end(kLongVrs), vr) != std::end(kLongVrs);
}

// The element at pos; items and delimiters (group FFFE) have no VR in either encoding.
WalkedElement element_at(const Reader& r, int64_t pos, bool explicit_vr) {
    const uint32_t tag = static_cast<uint32_t>(r.u16(pos)) << 16 | r.u16(pos + 2);
    if (explicit_vr && tag >> 16 != 0xFFFEu) {
        const uint16_t vr = r.u16(pos + 4);
        if (long_vr(vr)) return {tag, vr, pos + 12, r.u32(pos + 8)};
        return {tag, vr, pos + 8, r.u16(pos + 6)};
    }
    return {tag, 0, pos + 8, r.u32(pos + 4)};
}

// The offset after the delimiter `end` closing the undefined-length value at pos.
int64_t skip(const Reader& r, int64_t pos, bool explicit_vr, uint32_t end, int depth) {
    if (depth > kMaxWalkDepth) throw Unusual{};
    while (true) {
        if (pos >= r.size()) throw Shortfall{};
        const WalkedElement e = element_at(r, pos, explicit_vr);
        if (e.tag == end) return e.offset;
        if (e.length == kUndefined) {
            if (e.vr == kUN) throw Unusual{};
            pos = skip(r, e.offset, explicit_vr, e.tag == kItem ? kItemEnd : kSequenceEnd,
                       depth + 1);
        } else {
            pos = e.offset + e.length;
        }
    }
}

void walk(const Reader& r, int64_t pos, bool explicit_vr, bool complete,
          const uint32_t* wanted, int64_t n_wanted, Walk& out) {
    while (true) {
        if (pos == r.size()) {
            if (!complete) throw Shortfall{};
            return;
        }
        if (pos > r.size()) throw Shortfall{};
        const WalkedElement e = element_at(r, pos, explicit_vr);
        if (std::find(std::begin(kRefused), std::end(kRefused), e.tag) != std::end(kRefused) ||
            e.tag >> 16 == 0xFFFEu)
            throw Unusual{};
        if (e.tag == kPixelData) {
            if (e.length == kUndefined) throw Unusual{};
            out.pixel_offset = e.offset;
            out.pixel_length = e.length;
            return;
        }
        if (e.length == kUndefined) {
            if (e.vr == kUN) throw Unusual{};  // a sequence encoded in implicit VR
            pos = skip(r, e.offset, explicit_vr, kSequenceEnd, 1);
            continue;
        }
        if (e.offset + e.length > r.size()) throw Shortfall{};
        if (std::binary_search(wanted, wanted + n_wanted, e.tag))
            out.kept.push_back(e);
        pos = e.offset + e.length;
    }
}

}  // namespace

Walk walk_elements(const uint8_t* buf, int64_t size, int64_t pos, bool explicit_vr,
                   bool complete, const uint32_t* wanted, int64_t n_wanted) {
    Walk out;
    if (buf == nullptr || size < 0 || pos < 0 || n_wanted < 0 ||
        (n_wanted > 0 && wanted == nullptr)) {
        out.status = WalkStatus::unusual;
        return out;
    }
    try {
        walk(Reader(buf, size), pos, explicit_vr, complete, wanted, n_wanted, out);
    } catch (const Shortfall&) {
        out.status = WalkStatus::short_of;
    } catch (const Unusual&) {
        out.status = WalkStatus::unusual;
    }
    if (out.status != WalkStatus::ok) out.kept.clear();
    return out;
}

}  // namespace ubc

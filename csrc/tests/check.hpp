// The C++ tests' two assertions: a printed PASS/FAIL line each, failures counted for main().
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>

namespace ubc_test {

inline int& failures() {
    static int count = 0;
    return count;
}

inline void check(bool ok, const std::string& what) {
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
    if (!ok) ++failures();
}

// fn must throw std::invalid_argument (any other exception escapes and fails the program);
// when `needle` is given the message must contain it.
template <typename Fn>
void check_throws(Fn&& fn, const std::string& what, const std::string& needle = "") {
    try {
        fn();
    } catch (const std::invalid_argument& e) {
        const std::string message = e.what();
        check(message.find(needle) != std::string::npos, what + " (" + message + ")");
        return;
    }
    check(false, what + " did not throw");
}

}  // namespace ubc_test

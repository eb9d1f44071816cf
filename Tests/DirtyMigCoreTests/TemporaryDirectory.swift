import Foundation
import XCTest

/// A new directory only this user can enter (mkdtemp makes it 0700): /tmp/PREFIX-XXXXXX.
func privateTemporaryDirectory(_ prefix: String) throws -> String {
    var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
    guard mkdtemp(&template) != nil else { throw XCTSkip("cannot create a temporary directory under /tmp") }
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

#!/usr/bin/env python3
"""Writes corpus.jsonl: labelled texts for tests/corpus.rs.

Each line is {"text": ..., "expect": [[kind, substring], ...]} with the expected findings in
order of appearance. Valid numbers are computed here (Luhn, ISO 7064 MOD 11-2, ISO 13616
mod-97), near misses are derived from valid ones by breaking exactly one property.
Deterministic: python3 corpus_gen.py > corpus.jsonl
"""
import json
import random
import string
import sys

rng = random.Random(20231105)
lines = []


def add(text, *expect):
    pos = 0
    for kind, sub in expect:
        idx = text.find(sub, pos)
        assert idx >= 0, (text, sub)
        pos = idx + len(sub)
    lines.append({"text": text, "expect": [list(e) for e in expect]})


# ---------------------------------------------------------------- check digits

def luhn_check_digit(body):
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_ok(num):
    return luhn_check_digit(num[:-1]) == num[-1]


def card(prefix, length):
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return body + luhn_check_digit(body)


def spaced(num, groups):
    out, i = [], 0
    for g in groups:
        out.append(num[i:i + g])
        i += g
    assert i == len(num)
    return out


W = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]


def cn_check(body17):
    return "10X98765432"[sum(int(c) * w for c, w in zip(body17, W)) % 11]


def cn_id(region, y, m, d, seq):
    body = f"{region}{y:04d}{m:02d}{d:02d}{seq:03d}"
    return body + cn_check(body)


def iban_check(country, bban):
    s = bban + country + "00"
    n = int("".join(str(int(c, 36)) for c in s))
    return f"{98 - n % 97:02d}"


def iban(country, bban):
    return country + iban_check(country, bban) + bban


def iban_ok(s):
    s = s.replace(" ", "")
    r = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in r)) % 97 == 1


def group4(s):
    return " ".join(s[i:i + 4] for i in range(0, len(s), 4))


def rand(alphabet, n):
    return "".join(rng.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
UPPER_NUM = string.ascii_uppercase + string.digits

# ---------------------------------------------------------------- email
emails_en = [
    ("Please reply to john.doe@example.com by Friday.", "john.doe@example.com"),
    ("Send the invoice to billing+acme@finance.example.org", "billing+acme@finance.example.org"),
    ("Contact: jane_smith@mail.example.co.uk", "jane_smith@mail.example.co.uk"),
    ("My address is ANNA.LEE@EXAMPLE.NET, use capitals if you like", "ANNA.LEE@EXAMPLE.NET"),
    ("cc: test123@gmail.com; bcc: ops@ferry-gateway.io", "test123@gmail.com", "ops@ferry-gateway.io"),
    ("<a href=\"mailto:support@shop.example\">write us</a>", "support@shop.example"),
    ("From: \"Bob\" <bob.builder@construction.example.com>", "bob.builder@construction.example.com"),
    ("email=first.last-name@sub.domain.example.info&lang=en", "first.last-name@sub.domain.example.info"),
    ("The user (x@y.io) reported the bug.", "x@y.io"),
    ("{\"email\": \"maria.garcia@correo.example.es\"}", "maria.garcia@correo.example.es"),
    ("Reach me at o'brien@example.ie or at 'obrien@example.ie'.", "o'brien@example.ie", "obrien@example.ie"),
    ("noreply@github.com sent 3 notifications", "noreply@github.com"),
]
for text, *subs in emails_en:
    add(text, *[("email", s) for s in subs])

emails_zh = [
    ("请发邮件到zhang.san@qq.com，谢谢", "zhang.san@qq.com"),
    ("邮箱：li_si@163.com", "li_si@163.com"),
    ("我的邮箱是13812345678@163.com，手机也是这个号", "13812345678@163.com"),
    ("联系人王五（wangwu@company.cn）负责此事", "wangwu@company.cn"),
    ("简历请投递至hr@example.com.cn并注明岗位", "hr@example.com.cn"),
    ("客服邮箱support@aliyun-example.com。", "support@aliyun-example.com"),
    ("用户反馈：我的账号chen.xiaoming2020@outlook.com无法登录", "chen.xiaoming2020@outlook.com"),
    ("抄送给zhao@example.org和qian@example.org", "zhao@example.org", "qian@example.org"),
    ("请把报告发到 sun.li@university.edu.cn 。", "sun.li@university.edu.cn"),
    ("他的Gmail是zhou.jielun.fan@gmail.com吗？", "zhou.jielun.fan@gmail.com"),
    ("邮件地址：wu_9527@sina.com；电话另行提供", "wu_9527@sina.com"),
    ("発送先はtanaka@example.jpです", "tanaka@example.jp"),
    ("📧 emoji.lover@example.com 🎉", "emoji.lover@example.com"),
]
for text, *subs in emails_zh:
    add(text, *[("email", s) for s in subs])

email_misses = [
    "Type user@ and then press tab to complete",
    "Follow @ferry_gateway for updates",
    "ssh into foo@bar and restart",
    "write to john dot doe at example dot com",
    "the mailbox name@localhost is for tests",
    "use user@@example.com? no, that's a typo",
    "retina image icon@2x.png and logo@3x.jpg",
    "@Override public String toString()",
    "请输入邮箱，例如 名字@公司",
    "a@b.c is too short a domain",
    "npm install @scope/package@1.2.3",
    "微博@某某某 转发了",
]
for text in email_misses:
    add(text)

# ---------------------------------------------------------------- phone
phones = [
    ("Call me at +1 415-555-0132 tomorrow.", "+1 415-555-0132"),
    ("US office: +14155550132", "+14155550132"),
    ("NYC desk +1 (212) 555-0198, ask for Sam", "+1 (212) 555-0198"),
    ("Phone: +1-202-555-0143", "+1-202-555-0143"),
    ("London: +44 20 7946 0958", "+44 20 7946 0958"),
    ("mobile +44 7700 900123 (UK)", "+44 7700 900123"),
    ("tel:+442079460958", "+442079460958"),
    ("Switchboard +44 (0)20 7946 0958.", "+44 (0)20 7946 0958"),
    ("Paris +33 1 42 68 53 00", "+33 1 42 68 53 00"),
    ("Berlin +49 30 901820 or +49 171 1234567", "+49 30 901820", "+49 171 1234567"),
    ("Tokyo +81 3-1234-5678", "+81 3-1234-5678"),
    ("携帯 +81 90-1234-5678", "+81 90-1234-5678"),
    ("India support +91 98765 43210", "+91 98765 43210"),
    ("Sydney +61 2 9374 4000", "+61 2 9374 4000"),
    ("SG hotline +65 6123 4567", "+65 6123 4567"),
    ("香港办事处 +852 2123 4567", "+852 2123 4567"),
    ("台北 +886 2 2345 6789", "+886 2 2345 6789"),
    ("Seoul +82 10-1234-5678", "+82 10-1234-5678"),
    ("Madrid +34 912 345 678", "+34 912 345 678"),
    ("Roma +39 06 1234 5678", "+39 06 1234 5678"),
    ("Moscow +7 495 123-45-67", "+7 495 123-45-67"),
    ("São Paulo +55 11 91234-5678", "+55 11 91234-5678"),
    ("Dubai +971 50 123 4567", "+971 50 123 4567"),
    ("我的手机号是13812345678，请联系我", "13812345678"),
    ("手机：138-1234-5678", "138-1234-5678"),
    ("电话 138 1234 5678 （工作日）", "138 1234 5678"),
    ("联系方式15900001111", "15900001111"),
    ("请拨打+86 139 8765 4321找李经理", "+86 139 8765 4321"),
    ("+86-186-1234-5678是我的新号码", "+86-186-1234-5678"),
    ("国际格式+8617712345678", "+8617712345678"),
    ("号码8613912345678已停机", "8613912345678"),
    ("从国外拨打0086 13512345678", "0086 13512345678"),
    ("(+86)18812345678 王女士", "(+86)18812345678"),
    ("北京座机+86 10 6552 9988，上海+86 21 6888 1234", "+86 10 6552 9988", "+86 21 6888 1234"),
    ("快递员电话19912345678，放门口", "19912345678"),
    ("备用16612345678/13700001234", "16612345678", "13700001234"),
    ("Ping my cell 17612345678 if urgent", "17612345678"),
    ("号码：14712345678；微信同号", "14712345678"),
    ("📞13612345678📞", "13612345678"),
    ("Call +1 415-555-0132 12 times", "+1 415-555-0132"),
]
for text, *subs in phones:
    add(text, *[("phone", s) for s in subs])

phone_misses = [
    "Order #20231105-8842 has shipped",
    "订单号 202311051234567 已发货",
    "Invoice INV-2023-001234 is overdue",
    "Account number 4155550132 (no country code)",
    "The ID 12345678901 starts with 12, not a mobile",
    "中国移动客服10086",
    "Timestamp 1699171200000 in milliseconds",
    "The number 138123456789 has twelve digits",
    "only ten digits: 1381234567",
    "Math: 2+2=4 and 1+12345678=12345679",
    "Compile with C++17 and -O2",
    "Tracking number 1Z999AA10123456784",
    "快递单号SF1234567890123请查收",
    "快递单号 773012345678901",
    "QQ号 123456789 欢迎加好友",
    "ISBN 978-7-111-54742-6",
    "流水号20231105123456789012",
    "+1 234 is too short",
    "+1 023-555-0132 has no valid area code",
    "Version 13.8.12345678 of the firmware",
    "Serial 138-1234-5678-90",
    "the range 2023-11-05 to 2023-12-05",
    "Prices went from $1,234.56 to $13,812.34",
    "合计¥12,345.00元",
    "Meeting at 10:30-11:45 in room 1381",
    "Batch 13812345678A failed",
    "Coordinates 39.9042, 116.4074",
]
for text in phone_misses:
    add(text)

# ---------------------------------------------------------------- cn_id
regions = ["110105", "310104", "440305", "330106", "510107", "420102", "320102", "370202",
           "500103", "610113", "120101", "210102", "350203", "450103", "650102"]
cn_templates = [
    "身份证号{}",
    "身份证号码：{}，请核对",
    "我的身份证是{}。",
    "ID card no. {} on file",
    "乘车人：张三，证件号 {} ，座位12A",
    "Passenger ID {}",
    "请核实证件{}是否有效",
    "公民身份号码{}签发机关北京市公安局",
    "{}",
    "ID:{}",
]
ids = ["11010519491231002X"]
while len(ids) < 26:
    y = rng.randint(1950, 2010)
    m = rng.randint(1, 12)
    d = rng.randint(1, 28)
    ids.append(cn_id(rng.choice(regions), y, m, d, rng.randint(0, 999)))
xs = [i for i in ids if i.endswith("X")]
for idx, value in enumerate(ids):
    add(cn_templates[idx % len(cn_templates)].format(value), ("cn_id", value))
# A lowercase check character.
for value in ids[:40]:
    if value.endswith("X") and value != ids[0]:
        add(f"身份证{value[:-1]}x（小写）", ("cn_id", value[:-1] + "x"))
        break
else:
    add("身份证11010519491231002x（小写）", ("cn_id", "11010519491231002x"))


def break_check(value):
    good = value[-1]
    bad = "0" if good != "0" else "1"
    return value[:-1] + bad


cn_misses = []
for value in ids[1:11]:
    cn_misses.append(f"身份证号{break_check(value)}（校验位错误）")
cn_misses += [
    # impossible dates
    "证件号" + (lambda b: b + cn_check(b))("11010519990230123"),
    "ID " + (lambda b: b + cn_check(b))("31010419881315456"),
    "证件号" + (lambda b: b + cn_check(b))("44030520010229001"),
    # no such province
    "身份证" + (lambda b: b + cn_check(b))("99010519491231002"),
    # 17 and 19 characters
    "编号11010519491231002",
    "编号1101051949123100211",
    "订单号 202311051234567",
    "流水号 202311051234567890",
    "Order 20231105123456789X shipped",
]
for text in cn_misses:
    add(text)

# ---------------------------------------------------------------- card
test_cards = [
    ("4111111111111111", "Visa"), ("4012888888881881", "Visa"), ("4242424242424242", "Visa"),
    ("5555555555554444", "Mastercard"), ("5105105105105100", "Mastercard"),
    ("2223003122003222", "Mastercard"), ("378282246310005", "Amex"), ("371449635398431", "Amex"),
    ("6011111111111117", "Discover"), ("6011000990139424", "Discover"),
    ("3530111333300000", "JCB"), ("3566002020360505", "JCB"), ("30569309025904", "Diners"),
    ("38520000023237", "Diners"), ("6200000000000005", "UnionPay"),
]
for value, _ in test_cards:
    assert luhn_ok(value), value
gen_cards = [card("4", 16), card("51", 16), card("62", 19), card("6222", 16), card("4", 16), card("34", 15),
             card("2720", 16), card("65", 16)]
card_texts = [
    ("Card number: {}", None),
    ("Please charge {} for the order", None),
    ("我的信用卡号是{}，有效期12/27", None),
    ("银行卡{}转账失败", None),
    ("pay with {} exp 01/29 cvv 123", None),
]
for idx, (value, brand) in enumerate(test_cards):
    if idx % 3 == 0 and len(value) == 16:
        shown = " ".join(spaced(value, [4, 4, 4, 4]))
    elif idx % 3 == 1 and len(value) == 16:
        shown = "-".join(spaced(value, [4, 4, 4, 4]))
    elif len(value) == 15 and idx % 2 == 0:
        shown = " ".join(spaced(value, [4, 6, 5]))
    else:
        shown = value
    add(card_texts[idx % len(card_texts)][0].format(shown), ("card", shown))
for idx, value in enumerate(gen_cards):
    shown = value if idx % 2 == 0 or len(value) != 16 else " ".join(spaced(value, [4, 4, 4, 4]))
    add(["卡号：{}", "Use card {} please", "{} is my Visa", "付款卡号{}。"][idx % 4].format(shown), ("card", shown))
add("Two cards: 4111 1111 1111 1111 and 5555-5555-5555-4444.", ("card", "4111 1111 1111 1111"),
    ("card", "5555-5555-5555-4444"))
add("Amex 3782 822463 10005 expires soon", ("card", "3782 822463 10005"))


def break_luhn(value):
    last = int(value[-1])
    return value[:-1] + str((last + 1) % 10)


card_misses = []
for value, _ in test_cards[:10]:
    card_misses.append(f"Card {break_luhn(value)} was declined")
# Luhn-valid, but no issuer starts with 1, 7, 8, 9 or 0.
for prefix in ["1", "7", "8", "9", "0"]:
    card_misses.append(f"订单编号{card(prefix, 16)}已支付")
card_misses += [
    "Card 4111 1111 1111 111 is one digit short",
    "1234 5678 9012 3456 is a placeholder",
    "0000 0000 0000 0000",
    "Tracking 9400111899223100012345",
    "Batch id 41111111111111112 (17 digits)",
    "Ref INV-4111-1111-1111-1111",
    "值班表：2023 1105 0830 1730",
    "交易流水1699171200000123",
]
for text in card_misses:
    add(text)

# ---------------------------------------------------------------- iban
known_ibans = [
    "GB82WEST12345698765432", "DE89370400440532013000", "FR1420041010050500013M02606",
    "ES9121000418450200051332", "IT60X0542811101000000123456", "NL91ABNA0417164300",
    "BE68539007547034", "CH9300762011623852957", "AT611904300234573201",
    "PL61109010140000071219812874", "SE4550000000058398257466", "NO9386011117947",
    "DK5000400440116243", "FI2112345600000785", "IE29AIBK93115212345678",
    "PT50000201231234567890154", "LU280019400644750000",
]
for value in known_ibans:
    assert iban_ok(value), value
gen_ibans = [
    iban("DE", rand(string.digits, 18)), iban("GB", "NWBK" + rand(string.digits, 14)),
    iban("FR", rand(string.digits, 10) + rand(UPPER_NUM, 11) + rand(string.digits, 2)),
    iban("NL", "INGB" + rand(string.digits, 10)), iban("ES", rand(string.digits, 20)),
    iban("CH", rand(string.digits, 17)), iban("AE", rand(string.digits, 19)),
    iban("SA", rand(string.digits, 20)),
]
iban_templates = [
    "IBAN: {}",
    "Please transfer to {} (Acme GmbH)",
    "收款账户IBAN：{}，请备注发票号",
    "Beneficiary account {} BIC WESTGB2L",
    "银行账号{}，户名李四",
    "Wire the deposit to {}.",
]
for idx, value in enumerate(known_ibans + gen_ibans):
    shown = group4(value) if idx % 2 == 1 else value
    add(iban_templates[idx % len(iban_templates)].format(shown), ("iban", shown))
add("Old: DE89 3704 0044 0532 0130 00, new: GB82 WEST 1234 5698 7654 32.",
    ("iban", "DE89 3704 0044 0532 0130 00"), ("iban", "GB82 WEST 1234 5698 7654 32"))


def break_iban(value):
    check = int(value[2:4])
    return value[:2] + f"{(check + 1) % 97:02d}" + value[4:]


iban_misses = [f"IBAN {break_iban(v)} rejected by the bank" for v in known_ibans[:9]]
iban_misses += [
    "Account XX82WEST12345698765432 is not an IBAN country",
    "GB82WEST1234569876543 is one character short",
    "Part number DE12 ABCD 3456 7890 in stock",
    "Flight LH12 4567 8901 2345 departs at 10:30",
    "Model AB12 CDEF 3456 GHIJ 78",
    "账号US12 3456 7890 1234 5678不是IBAN",
    "SKU GB12345 size M",
    "Serial FR99 9999 9999 9999 9999 9999 999",
]
for text in iban_misses:
    add(text)

# ---------------------------------------------------------------- ip
ips = [
    ("Server at 192.168.1.10 is down", "192.168.1.10"),
    ("ssh admin@10.0.0.1 -p 22", "10.0.0.1"),
    ("Gateway 172.16.254.1; DNS 8.8.8.8", "172.16.254.1", "8.8.8.8"),
    ("Requests from 203.0.113.42 were blocked", "203.0.113.42"),
    ("curl http://198.51.100.7:8080/health", "198.51.100.7"),
    ("Broadcast 255.255.255.255 and loopback 127.0.0.1", "255.255.255.255", "127.0.0.1"),
    ("allow 10.0.0.0/8 in the firewall", "10.0.0.0"),
    ("服务器IP是10.1.2.3，端口8080", "10.1.2.3"),
    ("客户端地址：114.114.114.114。", "114.114.114.114"),
    ("登录IP：221.228.32.1（江苏）", "221.228.32.1"),
    ("内网机器192.168.0.100无法访问外网", "192.168.0.100"),
    ("IPv6 2001:db8::1 is the documentation prefix", "2001:db8::1"),
    ("full form 2001:0db8:85a3:0000:0000:8a2e:0370:7334 here", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("link-local fe80::1ff:fe23:4567:890a on eth0", "fe80::1ff:fe23:4567:890a"),
    ("mapped ::ffff:192.0.2.128 address", "::ffff:192.0.2.128"),
    ("Cloudflare DNS 2606:4700:4700::1111", "2606:4700:4700::1111"),
    ("Listen on [2001:db8::42]:8080", "2001:db8::42"),
    ("服务器IPv6地址为2400:3200::1，请配置", "2400:3200::1"),
    ("客户端 240e:3b7:3272:d8d0:db09:c067:8d59:539e 访问异常", "240e:3b7:3272:d8d0:db09:c067:8d59:539e"),
    ("host:2001:db8:0:0:1:0:0:1 responded", "2001:db8:0:0:1:0:0:1"),
    ("The address was 2001:db8::dead:beef: unreachable", "2001:db8::dead:beef"),
    ("X-Forwarded-For: 203.0.113.195, 70.41.3.18, 150.172.238.178",
     "203.0.113.195", "70.41.3.18", "150.172.238.178"),
    ("日志：用户从36.110.218.5登录", "36.110.218.5"),
    ("🌐 1.1.1.1 🌐", "1.1.1.1"),
    ("ping 100.64.0.1 timed out", "100.64.0.1"),
    ("IP地址（8.8.4.4）解析正常", "8.8.4.4"),
]
for text, *subs in ips:
    add(text, *[("ip", s) for s in subs])

ip_misses = [
    "999.1.1.1 is not an address",
    "256.0.0.1 is out of range",
    "Upgrade to version 1.2.3.4.5 now",
    "Release v1.2.3.4 is out",
    "Dated 2023.11.05",
    "Meeting at 12:30:45 sharp",
    "MAC address 00:1A:2B:3C:4D:5E",
    "use std::vector and std::map",
    "the subnet 192.168.1 is incomplete",
    "01.02.03.04 has leading zeros",
    "pi is 3.14159265",
    "版本号 10.0.19045.3570",
    "Chrome/120.0.6099.109 Safari/537.36",
    "Add::add and Dead::beef are Rust paths",
    "时间 2023-11-05T10:30:45Z",
    "比分 3:2:1",
]
for text in ip_misses:
    add(text)

# ---------------------------------------------------------------- secret
def b64url(n):
    return rand(string.ascii_letters + string.digits + "-_", n)


jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
pem_body = "\n".join(rand(string.ascii_letters + string.digits + "+/", 64) for _ in range(5))
pem = f"-----BEGIN RSA PRIVATE KEY-----\n{pem_body}\n-----END RSA PRIVATE KEY-----"
pem2 = f"-----BEGIN PRIVATE KEY-----\n{pem_body[:130]}\n-----END PRIVATE KEY-----"
pem3 = f"-----BEGIN OPENSSH PRIVATE KEY-----\n{pem_body[65:260]}\n-----END OPENSSH PRIVATE KEY-----"
pem_truncated = f"-----BEGIN EC PRIVATE KEY-----\n{pem_body[:129]}"

secrets = [
    ("export OPENAI_API_KEY={}", "sk-proj-" + rand(ALNUM, 40) + "_" + rand(ALNUM, 40)),
    ("Authorization: Bearer {}", "sk-" + rand(ALNUM, 48)),
    ("我的key是{}，帮我看看为什么报错", "sk-" + rand(ALNUM, 48)),
    ("{{\"api_key\": \"{}\"}}", "sk-ant-api03-" + b64url(93) + "AA"),
    ("git clone https://{}@github.com/acme/repo.git", "ghp_" + rand(ALNUM, 36)),
    ("GITHUB_TOKEN={}", "gho_" + rand(ALNUM, 36)),
    ("token: {}", "github_pat_11" + rand(UPPER_NUM, 20) + "_" + rand(ALNUM, 59)),
    ("aws_access_key_id = {}", "AKIAIOSFODNN7EXAMPLE"),
    ("AWS临时凭证{}已过期", "ASIA" + rand(UPPER_NUM, 16)),
    ("slack bot token {} leaked", "xoxb-" + rand(string.digits, 12) + "-" + rand(string.digits, 13) + "-" + rand(ALNUM, 24)),
    ("user token: {}", "xoxp-" + rand(string.digits, 11) + "-" + rand(string.digits, 12) + "-" + rand(string.digits, 13) + "-" + rand("abcdef0123456789", 32)),
    ("maps key {} in the config", "AIza" + rand(ALNUM + "-_", 35)),
    ("Stripe secret {}", "sk_live_" + rand(ALNUM, 24)),
    ("restricted key {}", "rk_live_" + rand(ALNUM, 24)),
    ("测试环境密钥{}", "sk_test_" + rand(ALNUM, 24)),
    ("GitLab PAT {}", "glpat-" + rand(ALNUM, 20)),
    ("HF_TOKEN={}", "hf_" + rand(ALNUM, 34)),
    ("Cookie: session={}", jwt),
    ("私钥如下：\n{}\n请妥善保管", pem),
    ("key.pem:\n{}", pem2),
    ("~/.ssh/id_ed25519\n{}\n", pem3),
    ("pasted half a key: {}\nand then the logs said: Error: invalid key format", pem_truncated),
    ("{{\"type\": \"service_account\", \"private_key\": \"{}\\n\", \"client_email\": \"svc@proj.iam.gserviceaccount.com\"}}",
     pem2.replace("\n", "\\n")),
    ("one line: {} (newlines lost)", pem.replace("\n", " ")),
    ("API密钥：{}。", "sk-" + rand(ALNUM, 32)),
    ("curl -H 'Authorization: token {}' https://api.github.com", "ghs_" + rand(ALNUM, 36)),
    ("两个key：{} 和 {}", None),
    ("Refresh token {} expires", "ghr_" + rand(ALNUM, 36)),
    ("OPENAI_API_KEY=\"{}\"", "sk-svcacct-" + b64url(60)),
]
for template, value in secrets:
    if value is None:
        first, second = "sk-" + rand(ALNUM, 48), "AKIA" + rand(UPPER_NUM, 16)
        add(template.format(first, second), ("secret", first), ("secret", second))
        continue
    text = template.format(value)
    if "client_email" in text:
        add(text, ("secret", value), ("email", "svc@proj.iam.gserviceaccount.com"))
        continue
    add(text, ("secret", value))

secret_misses = [
    "commit 3f786850e387550fdab836ed7e6dc881de23001b fixed it",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "request id 123e4567-e89b-12d3-a456-426614174000",
    "we use sk-learn for the baseline",
    "set OPENAI_API_KEY=sk-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx in your env",
    "the key AKIA1234 is truncated",
    "ghp_short is not a token",
    "task-1234567890abcdefghijklmn is a job name",
    "risk-assessment-framework-2023-v2-final",
    "base64 SGVsbG8gd29ybGQhIEhlbGxvIHdvcmxkIQ==",
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    "header eyJhbGciOiJIUzI1NiJ9 alone is not a token",
    "密钥格式为sk-开头的字符串",
    "AKIA开头的是AWS访问密钥",
    "desk-of-the-week-award-2023 winner",
]
for text in secret_misses:
    add(text)

# ---------------------------------------------------------------- mixed
v_card = card("4", 16)
v_id = cn_id("310104", 1988, 7, 15, 123)
mixed = [
    (f"Name: Li Lei, phone 13912345678, email lilei@example.com, card {v_card}",
     ("phone", "13912345678"), ("email", "lilei@example.com"), ("card", v_card)),
    (f"客户张三，身份证{v_id}，手机138-0013-8000，邮箱zs@example.cn",
     ("cn_id", v_id), ("phone", "138-0013-8000"), ("email", "zs@example.cn")),
    ("Refund to GB82 WEST 1234 5698 7654 32, confirm at +44 20 7946 0958",
     ("iban", "GB82 WEST 1234 5698 7654 32"), ("phone", "+44 20 7946 0958")),
    ("Login from 203.0.113.9 with key sk-" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4",
     ("ip", "203.0.113.9"), ("secret", "sk-a1B2c3D4e5F6g7H8i9J0k1L2m3N4")),
    ("订单2023110512345已付款，卡号6200000000000005，收货电话15012345678",
     ("card", "6200000000000005"), ("phone", "15012345678")),
    ("No PII here: order #20231105-8842, total $1,234.56, shipped 2023-11-05.",),
    ("Nothing sensitive: 版本 1.2.3.4.5, 时间 10:30, 价格 ¥99.00",),
    ("ops@example.com pinged 10.20.30.40 and +1 415-555-0199",
     ("email", "ops@example.com"), ("ip", "10.20.30.40"), ("phone", "+1 415-555-0199")),
    ("转账至DE89370400440532013000，并抄送财务finance@example.de",
     ("iban", "DE89370400440532013000"), ("email", "finance@example.de")),
    ("ID 11010519491231002X / tel 13800138000 / IP 8.8.8.8",
     ("cn_id", "11010519491231002X"), ("phone", "13800138000"), ("ip", "8.8.8.8")),
]
for text, *expect in mixed:
    add(text, *expect)

# ---------------------------------------------------------------- formats seen in the wild
wild = [
    ("| 张三 | 13812345678 | 北京 |", ("phone", "13812345678")),
    ("GET /api/users?phone=13812345678&page=2", ("phone", "13812345678")),
    ("{\"mobile\":\"15912345678\",\"email\":\"a.b@example.com\"}", ("phone", "15912345678"),
     ("email", "a.b@example.com")),
    ("Tel:+86(10)65529988", ("phone", "+86(10)65529988")),
    ("13812345678,13987654321,15011112222", ("phone", "13812345678"), ("phone", "13987654321"),
     ("phone", "15011112222")),
    ("Tel.13812345678 Fax.010-65529988", ("phone", "13812345678")),
    ("card #4111111111111111 exp 12/25", ("card", "4111111111111111")),
    ("5555 5555 5555 4444 2023-11 expiry", ("card", "5555 5555 5555 4444")),
    ("The server 192.168.1.1.", ("ip", "192.168.1.1")),
    ("ip=10.0.0.5&user=bob@example.com", ("ip", "10.0.0.5"), ("email", "bob@example.com")),
    ("<td>zhangsan@example.com</td><td>11010519491231002X</td>", ("email", "zhangsan@example.com"),
     ("cn_id", "11010519491231002X")),
    ("> quoted: call +1 415-555-0100 now", ("phone", "+1 415-555-0100")),
    ("const MAX_SAFE = 9007199254740993; // not a card",),
    ("OID 1.3.6.1.2.1.1.1.0 is sysDescr",),
    ("ratio 0.13812345678 is a float",),
    ("ORDER-13812345678 shipped",),
    ("RGB(255,255,255) and rgba(1,2,3,0.5)",),
    ("Hash 4111111111111111a is not a card",),
    ("Build 20231105.1 of app 4.2.0",),
    ("Call extension 5678 or room 1234",),
    ("经纬度 116.397128,39.916527",),
    ("文件 report_13812345678.pdf 已上传",),
    ("user_id=1234567890123456789 (snowflake)",),
]
for text, *expect in wild:
    add(text, *expect)

for line in lines:
    sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
